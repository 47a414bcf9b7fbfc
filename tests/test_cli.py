"""The command line: help for every command, one-line errors, show and convert."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moaplan.cli import SUBCOMMANDS, build_parser, main
from moaplan.plan import Budget, ModelShape, load_plan, save_plan, uniform_plan


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moaplan", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "usage: moaplan" in capsys.readouterr().out


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: moaplan/1\nmodel: 3\n")
    result = run_cli("show", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "'model' must be a mapping" in result.stderr


def test_show_prints_table_and_writes_a_heatmap_only_when_asked(tmp_path, capsys):
    plan = uniform_plan(ModelShape(3, 4, 2, 16), Budget("kv", 0.5), [1024, 4096])
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert main(["show", str(path), "--lengths", "1024", "4096"]) == 0
    out = capsys.readouterr().out
    assert "kv@4096" in out and "all" in out and "0.500" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]
    png = tmp_path / "heat.png"
    assert main(["show", str(path), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(path), "--lengths", "4096", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["kv_density"] == {"4096": 0.5} and len(record["layers"]) == 3


def test_convert_moa_and_duo(tmp_path):
    moa = tmp_path / "moa.json"
    moa.write_text(json.dumps({"alphas": [[512, 1024]] * 2, "betas": [[0.25, 0.5]] * 2}))
    out = tmp_path / "moa.yaml"
    assert main(["convert", "moa", str(moa), "--shape", "2,2,2,64", "--out", str(out)]) == 0
    assert load_plan(out).rules[1][1].beta == 0.5
    duo = tmp_path / "heads.tsv"
    duo.write_text("1\t0\n0\t0\n")
    out = tmp_path / "duo.yaml"
    assert main(["convert", "duo", str(duo), "--shape", "2,4,2,16", "--out", str(out),
                 "--threshold", "0.5"]) == 0
    assert sum(r.full for r in load_plan(out).flat_rules) == 1


def test_convert_needs_a_shape(tmp_path):
    result = run_cli("convert", "moa", "x.json", "--out", str(tmp_path / "o.yaml"))
    assert result.returncode == 2 and "give --model" in result.stderr


# the shipped plans; `make demo` leaves its profile (and the profile's .profile.yaml) beside them
SHIPPED = sorted(p for p in (Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml")
                 if not p.name.endswith(".profile.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_plans_fit_the_reference_model(path):
    from moaplan.model import load_model

    plan = load_plan(path)
    plan.check_model(load_model()[0].config, strict=True)
    per_length = plan.densities(plan.lengths)["kv"].mean(axis=(0, 1))
    assert plan.budget is not None and per_length.max() <= plan.budget.value + 1e-9


def test_generate_continues_a_prompt_under_a_shipped_plan(capsys):
    plan = next(p for p in SHIPPED if "searched" in p.name)
    assert main(["generate", "--plan", str(plan), "--prompt", "import os\n",
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    text, stats = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    assert text.startswith("import os\n") and len(text) > len("import os\n")
    assert stats.startswith("-- 12 new tokens") and "KV cache" in stats


def test_generate_reports_a_missing_prompt_file(tmp_path):
    plan = next(p for p in SHIPPED if "streaming" in p.name)
    missing = run_cli("generate", "--plan", str(plan), "--prompt-file", str(tmp_path / "no"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "cannot read --prompt-file" in missing.stderr


# (alpha, beta) pairs that share a layer in MoA's published plan for Llama-3-8B-Instruct-262k
# (32 layers x 32 query heads, 8 KV heads): alphas from -1024 to 3072, and -1024 + 1.0 N.
MOA_LAYER_PAIRS = [
    ((0, 0.625), (0, 0.75)), ((1024, 0), (0, 0.75)), ((0, 0.25), (-1024, 1.0)),
    ((0, 0.75), (0, 0.375)), ((2048, 0.5), (0, 0.25)), ((1024, 0), (-1024, 1.0)),
    ((-1024, 1.0), (0, 0.5)), ((0, 0.25), (-1024, 1.0)), ((-1024, 1.0), (1024, 0.125)),
    ((0, 0.25), (3072, 0.375)), ((-1024, 1.0), (1024, 0.0)), ((0, 0.0), (3072, 0.0)),
    ((1024, 1.0), (-1024, 1.0)), ((-1024, 0.125), (0, 0.125)), ((1024, 0.75), (0, 0)),
]


def test_convert_moa_with_published_value_ranges_keeps_the_widest_span(tmp_path):
    rng = np.random.default_rng(0)
    layers, heads, kv = 32, 32, 8
    pairs = [MOA_LAYER_PAIRS[layer % len(MOA_LAYER_PAIRS)] for layer in range(layers)]
    picks = rng.integers(0, 2, size=(layers, heads))
    alphas = np.array([[pairs[i][k][0] for k in row] for i, row in enumerate(picks)], float)
    betas = np.array([[pairs[i][k][1] for k in row] for i, row in enumerate(picks)])
    assert (alphas < 0).any() and alphas.min() == -1024 and alphas.max() == 3072
    moa = tmp_path / "moa.json"
    moa.write_text(json.dumps({"alphas": alphas.tolist(), "betas": betas.tolist()}))
    out = tmp_path / "plan.yaml"
    with pytest.warns(UserWarning, match="group of 4"):
        assert main(["convert", "moa", str(moa), "--shape", f"{layers},{heads},{kv},128",
                     "--out", str(out)]) == 0
    plan = load_plan(out)
    for n in (4096, 8192, 16384, 32768):
        # MoA's a + bN clamped to [1, N]: a query always sees itself.
        moa_spans = np.clip(np.floor(alphas + betas * n + 0.5), 1, n)
        widest = moa_spans.reshape(layers, kv, heads // kv).max(-1)
        ours = np.array([[rule.span(n) for rule in row] for row in plan.rules])
        np.testing.assert_array_equal(ours, widest)


def test_cli_defaults_are_the_librarys_and_load_no_torch():
    # the parsers spell a few library defaults out so that building them imports no torch;
    # they must say the same as the library, and every model command defaults to --device auto
    probe = ("import sys; from moaplan.cli import build_parser; p = build_parser(); "
             "a = p.parse_args(['profile']); print(a.block, a.device, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    from moaplan.profile.record import BLOCK

    assert out == [str(BLOCK), "auto", "False"]
    parser = build_parser()
    for argv in (["search", "--budget", "0.5"], ["baseline", "duo", "--budget", "0.5", "--out",
                 "x.yaml"], ["eval", "--task", "ppl"], ["generate", "--plan", "p.yaml",
                 "--prompt", "x"], ["compare-scorers"], ["influence", "--data", "d.jsonl",
                 "--heads", "2"]):
        assert parser.parse_args(argv).device == "auto", argv
