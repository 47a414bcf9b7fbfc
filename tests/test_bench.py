"""The benchmark suite driver (its quick quality run end to end, its README splice) and the
decode benchmark's choice of the dense baseline's SDPA backend."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import run  # noqa: E402


def test_quick_quality_run_writes_results_plots_and_summary(tmp_path):
    # On a CPU machine a GPU section is skipped with one line; on a GPU it would really run.
    sections = ["quality"] + ([] if torch.cuda.is_available() else ["prefill"])
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--section", *sections,
         "--out", str(tmp_path), "--no-readme"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / run.machine_name(torch.cuda.get_device_name()
                                      if torch.cuda.is_available() else None)
    report = json.loads((out / "quality-reference.json").read_text())
    methods = [(m["method"], m["budget"]) for m in report["methods"]]
    assert methods == [("dense", None), ("streaming", 0.5), ("duo", 0.5), ("searched", 0.5)]
    for m in report["methods"]:
        assert all(d <= (m["budget"] or 1.0) + 1e-9 for d in m["kv_density"].values())
        assert m["passkey"]["cells"] and m["kv"]["cells"] and m["perplexity"]["cells"]
    assert report["meta"]["commit"] and report["meta"]["date"]
    for kind in ("accuracy", "passkey", "kv"):
        assert (out / f"quality-reference_{kind}.png").read_bytes().startswith(b"\x89PNG")
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| searched @ 0.5 |" in summary and "- KV 0.5: searched retrieval" in summary
    suite = json.loads((out / "suite.json").read_text())
    assert suite["sections"]["quality"]["status"] == "ok"
    if not torch.cuda.is_available():
        assert "skipped prefill: needs 1 CUDA GPU, this machine has 0" in proc.stdout + proc.stderr
        assert suite["sections"]["prefill"]["status"] == "skipped"


@pytest.mark.parametrize("before", ["# Title\n\nintro\n",
                                    "# T\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\nrest\n"])
def test_readme_section_is_replaced_or_appended(tmp_path, before):
    readme = tmp_path / "README.md"
    readme.write_text(before)
    run.update_readme(readme, "new table")
    run.update_readme(readme, "newer table")  # idempotent: one section, the latest text
    text = readme.read_text()
    assert text.count("<!-- bench:start -->") == 1 and "newer table" in text
    assert "old" not in text and "new table" not in text
    assert text.startswith(before.split("\n")[0])
    assert "rest" in text or "<!-- bench" not in before


def test_machine_names():
    assert run.machine_name(None) == "cpu"
    assert run.machine_name("NVIDIA H100 80GB HBM3") == "h100"
    assert run.machine_name("NVIDIA A100-SXM4-80GB") == "a100"


def test_dense_backend_is_picked_by_its_faster_graph():
    # StaticCache + SDPA: the default backend's plain graph is faster, the other's compiled
    # graph fastest of all, so the other is taken; a backend that fails is recorded.
    import bench_decode

    rows = iter([dict(graph_tokens_per_s=40.0, compiled_graph_tokens_per_s=50.0),
                 dict(graph_tokens_per_s=30.0, compiled_graph_tokens_per_s=90.0)])
    picked = bench_decode.by_backend(lambda: next(rows))
    names = list(bench_decode.DENSE_BACKENDS)
    assert picked["sdpa_backend"] == names[1]
    assert picked["rate_by_backend"] == {names[0]: 50.0, names[1]: 90.0}

    def fails():
        raise RuntimeError("out of memory\nmore")

    failed = bench_decode.by_backend(fails)
    assert failed == {"error": "; ".join(f"{name}: out of memory" for name in names)}


def test_first_token_rows_take_each_sides_faster_run_and_bound_it_by_the_skipped_work():
    import bench_first_token

    result = {"layers": 2, "lengths": [4, 8], "sdpa_layer_s": {"4": 0.1, "8": 0.4},
              "plans": {"moa_q": {"kv": {"4": 0.9, "8": 0.6},
                                  "attention": {"4": 0.5, "8": 0.25}}},
              "ttft_s": {"dense": {"4": 1.0, "8": 2.0}, "moa_q": {"4": 0.95, "8": 1.5}},
              "ttft_compiled_s": {"dense": {"4": 0.9, "8": 2.5},
                                  "moa_q": {"error": "compiling failed"}}}
    short, long = bench_first_token.rows(result)
    assert (short["dense_s"], short["ours_s"]) == (0.9, 0.95)  # dense compiled, plan eager
    # 2 layers x 0.4 s of SDPA, three quarters of it skipped: at best 2.0 / 1.4.
    assert long["speedup"] == pytest.approx(2.0 / 1.5)
    assert long["bound_speedup"] == pytest.approx(2.0 / 1.4)
    report = dict(result, rows=[short, long], card="card", date="today", commit="abc",
                  torch="t", triton="tr", rounds={"4": 3, "8": 1})
    text = bench_first_token.markdown(report)
    assert "1.333x | 1.429x |" in text and "compiling failed" in text
    assert "after a warm-up (runs: " in text
