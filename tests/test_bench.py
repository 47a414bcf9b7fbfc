"""The benchmark suite driver (its quick quality run end to end, its README splice) and the
decode benchmark's choice of the dense baseline's SDPA backend."""

import dataclasses
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
    from bench_decode import LONG

    long = str(LONG)
    result = {"layers": 2, "lengths": [4, LONG], "sdpa_layer_s": {"4": 0.1, long: 0.4},
              "sdpa_in_model_s": {"4": 0.1, long: 0.2},
              "plans": {"moa_q": {"kv": {"4": 0.9, long: 0.6},
                                  "attention": {"4": 0.5, long: 0.25}}},
              "ttft_s": {"dense": {"4": 1.0, long: 2.0}, "moa_q": {"4": 0.95, long: 1.5}},
              "ttft_compiled_s": {"dense": {"4": 0.9, long: 2.5},
                                  "moa_q": {"error": "compiling failed"}},
              # The runs behind each median (the long prompt's dense faster is eager); the
              # shorter prompt's plan side kept none (a result from before runs were kept).
              "runs_s": {"dense": {"eager": {"4": [1.0, 1.0], long: [1.99, 2.0, 2.01]},
                                   "compiled": {"4": [0.9, 0.9], long: [2.5, 2.5]}},
                         "moa_q": {"eager": {long: [1.49, 1.5, 1.51]},
                                   "compiled": {"error": "compiling failed"}}}}
    short, longer = bench_first_token.rows(result)
    assert (short["dense_s"], short["ours_s"]) == (0.9, 0.95)  # dense compiled, plan eager
    assert short["speedup_ci"] is None
    result["runs_s"]["moa_q"]["eager"]["4"] = [0.94, 0.95, 0.96]
    kept = bench_first_token.rows(result)[0]["speedup_ci"]  # 0.9 s runs against 0.95 s ones
    assert kept["low"] < 0.9 / 0.95 < kept["high"] < 1.0 and kept["runs"] == 2
    del result["runs_s"]["moa_q"]["eager"]["4"]
    # 2 layers x 0.4 s of SDPA, three quarters of it skipped: at best 2.0 / 1.4.
    assert longer["speedup"] == pytest.approx(2.0 / 1.5)
    assert longer["bound_speedup"] == pytest.approx(2.0 / 1.4)
    # SDPA at half that speed in the model: 2 x 0.2 s, three quarters skipped.
    assert longer["bound_in_model_speedup"] == pytest.approx(2.0 / 1.7)
    ci = longer["speedup_ci"]
    assert ci["low"] < 2.0 / 1.5 < ci["high"] < 1.36 and ci["runs"] == 3
    report = dict(result, rows=[short, longer], card="card", date="today", commit="abc",
                  torch="t", triton="tr", rounds={"4": 3, long: 3})
    text = bench_first_token.markdown(report)
    assert "| 1.333x | [1.3" in text and "] | 1.429x | 1.176x |" in text
    assert "| 0.947x | - | 1.125x | 1.125x |" in text and "in-model: CUDA events" in text
    del report["sdpa_in_model_s"]
    text = bench_first_token.markdown(dict(report, rows=bench_first_token.rows(report)))
    assert "] | 1.429x | - |" in text and "not measured in this run" in text
    assert "compiling failed" in text and "after a warm-up (runs: " in text


def test_first_token_paired_rows_pair_the_sides_within_each_round():
    import bench_first_token
    from bench_decode import LONG

    # The card slows by 5% a round; the plan is 1.5x faster than dense within every round.
    dense = [2.0 * 1.05 ** r for r in range(4)]
    result = {"layers": 2, "n": LONG, "rounds": 4, "sdpa_layer_s": 0.5,
              "sdpa_in_model_s": 0.4, "attention_density": {"moa_q": 0.5},
              "runs_s": {"dense": dense, "moa_q": [d / 1.5 for d in dense]}}
    (row,) = bench_first_token.paired_rows(result)
    assert row["speedup"]["mean"] == pytest.approx(1.5)
    assert row["speedup"]["high"] - row["speedup"]["low"] < 1e-9  # the drift cancels
    median = (dense[1] + dense[2]) / 2
    # 2 layers x half of each layer's SDPA skipped: 0.5 s alone, 0.4 s in the model.
    assert row["bound_speedup"] == pytest.approx(median / (median - 0.5))
    assert row["bound_in_model_speedup"] == pytest.approx(median / (median - 0.4))
    report = dict(result, rows=[row], card="card", date="today", commit="abc", torch="t",
                  triton="tr")
    text = bench_first_token.paired_markdown(report)
    assert "| MoA-like, per-query-head spans | 0.500 |" in text
    assert "| 1.500x | [1.500, 1.500] |" in text
    assert "in each of 4 rounds" in text and "400.0 ms in the model" in text


def test_summary_names_the_paired_first_token_run_and_its_bounds(tmp_path):
    import summary
    from bench_first_token import paired_markdown, paired_rows

    result = {"layers": 2, "n": 131072, "rounds": 2, "sdpa_layer_s": 0.5, "sdpa_in_model_s": 0.4,
              "attention_density": {"mixed": 0.5}, "runs_s": {"dense": [2.0, 2.2],
                                                              "mixed": [1.6, 1.76]}}
    report = dict(result, rows=paired_rows(result), card="Card X", date="today",
                  commit="abc1234", torch="t", triton="tr")
    card = tmp_path / "card-x"
    card.mkdir()
    (card / "first_token_paired.json").write_text(json.dumps(report))
    (card / "first_token_paired.md").write_text(paired_markdown(report))
    text = summary.summary_markdown(tmp_path, "card-x", None)
    assert "The same at 128K with the sides taking turns in each of 2 rounds" in text
    # Dense's median 2.1 s less one layer's SDPA (2 layers, half skipped): 0.5 s, 0.4 s.
    assert ("mixed (density constant in N) 1.250x [1.250, 1.250] (bound 1.312x, 1.235x "
            "in-model)") in text


def test_paired_speedup_interval_cancels_the_rounds_common_drift():
    from timing import Speedup

    # The card slows by 10% a round; ours stays 2% faster than dense within every round.
    dense = [1.0, 1.1, 1.21, 1.331]
    ours = [d / 1.02 for d in dense]
    paired = Speedup.paired(dense, ours)
    assert paired.mean == pytest.approx(1.02) and paired.high - paired.low < 1e-9
    assert paired.against(1.0) == "above" and paired.against(1.02 + 1e-6) == "below"
    # The same times unpaired: the drift is noise, and the interval holds 1.
    unpaired = Speedup.unpaired(dense, ours)
    assert unpaired.mean == pytest.approx(1.02) and unpaired.against(1.0) == "tie"
    noisy = Speedup.paired([1.0, 1.0, 1.0], [0.99, 1.01, 1.0])
    assert noisy.low < 1.0 < noisy.high and str(noisy).startswith("1.000x [")
    assert Speedup.paired([1.0], [0.5]).against(1.0) == "tie"  # one round: no interval


def test_layer_report_names_only_layers_significantly_slower_than_dense():
    import bench_layers
    from timing import Speedup

    def layer(i: int, dense: list[float], ours: list[float], route: str = "sparse") -> dict:
        ci = dataclasses.asdict(Speedup.paired(dense, ours))
        return {"layer": i, "n": 4096, "density_kv": 0.97, "density_q": 0.8,
                "route": {"kv": route, "q": route},
                "ms": {"kv": ours[0], "q": ours[0], "kernel": ours[0]}, "dense_ms": dense[0],
                "speedup": {name: dense[0] / ours[0] for name in ("kv", "q", "kernel")},
                "speedup_ci": {"kv": ci, "q": ci}, "eta_kv": 1.0, "eta_q": 1.0}

    ties = layer(0, [1.0, 1.0, 1.0], [1.01, 0.99, 1.0])
    slower = layer(1, [1.0, 1.0, 1.0], [1.05, 1.06, 1.05])
    control = layer(2, [1.0, 1.0, 1.0], [1.07, 1.07, 1.08], route="dense")
    total = dataclasses.asdict(Speedup.paired([2.0, 2.0, 2.0], [2.06, 2.05, 2.05]))
    result = {"meta": {"card": "card", "date": "today", "commit": "abc", "torch": "t",
                       "triton": "tr"}, "cost_model": {}, "rounds": 3, "correctness": [],
              "lengths": [{"n": 4096, "sdpa_ms": 1.0, "sdpa_gqa_ms": 1.0,
                           "dense_total_ms": 2.0, "layers": [ties, slower, control],
                           "total_ms": {"kv": 2.05, "q": 2.05, "kernel": 2.05},
                           "speedup": {"kv": 0.98, "q": 0.98, "kernel": 0.98},
                           "speedup_ci": {"kv": total, "q": total},
                           "ideal_speedup": {"kv": 1.03, "q": 1.25}}]}
    text = bench_layers.markdown(result)
    assert "median of 3 rounds" in text
    slow_line = next(line for line in text.splitlines() if line.startswith("Layers slower"))
    windowed, _, controls = slow_line.partition("On the dense route")
    assert "4096 layer 1 kv 0.949x [" in windowed and "layer 0" not in slow_line
    # The all-full layer on the dense route is the baseline's own call: named apart.
    assert "layer 2" not in windowed and "4096 layer 2 kv 0.932x [" in controls
    over_all = next(line for line in text.splitlines() if line.startswith("| 4096 | 8.00 |"))
    assert "0.949x [" in over_all and "0.932x" not in over_all  # the slowest windowed one
    assert "| 1.000x [" in text and "] tie |" in text
