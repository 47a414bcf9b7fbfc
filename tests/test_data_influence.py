"""AttentionInfluence data scoring: the masking plan, the scores, the JSONL, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from moaplan.cli import main
from moaplan.data import CalibrationSample
from moaplan.errors import PlanError
from moaplan.eval.data_influence import (
    InfluenceScore,
    auc,
    influence_scores,
    masked_heads_plan,
    write_scores,
)
from moaplan.model import byte_tokenizer
from moaplan.plan import ModelShape
from moaplan.profile.profiler import response_loss
from moaplan.rules import Rule


def _model():
    """A tiny random Qwen2 with the byte vocabulary (ids 256-258: <s>, </s>, <pad>)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=259, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return Qwen2ForCausalLM(config).eval()


def _samples(count=3, n=96):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n - 16:] = True
    return [CalibrationSample(torch.randint(0, 256, (n,), generator=g), mask)
            for _ in range(count)]


def test_masked_heads_plan():
    shape = ModelShape(3, 4, 2, 16, model_type="llama")
    plan = masked_heads_plan(shape, [(1, 0), (2, 1)], Rule.window(8, sink=4))
    kinds = [[r.full for r in layer] for layer in plan.rules]
    assert kinds == [[True, True], [False, True], [True, False]]
    assert plan.rules[1][0] == Rule.window(8, sink=4)
    assert plan.provenance["masked_heads"] == [[1, 0], [2, 1]]
    with pytest.raises(PlanError, match=r"head \(3, 0\) is not in a model"):
        masked_heads_plan(shape, [(3, 0)])


def test_scores_are_relative_loss_increases_and_the_model_is_restored():
    model, samples = _model(), _samples()
    plan = masked_heads_plan(ModelShape.from_config(model.config), [(0, 0), (1, 1)],
                             Rule.window(4))
    calls = []
    scores = influence_scores(model, samples, plan, on_sample=lambda: calls.append(1))
    assert len(calls) == 6 and [s.index for s in scores] == [0, 1, 2]
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        dense = [float(response_loss(model, s)[0]) for s in samples]
    for s, d in zip(scores, dense, strict=True):
        assert s.dense_loss == pytest.approx(d, rel=1e-6)
        assert s.masked_loss != pytest.approx(d, rel=1e-4)  # the mask changed the loss
        assert s.score == pytest.approx((s.masked_loss - d) / d)
    # masking nothing changes nothing
    unmasked = influence_scores(model, samples, masked_heads_plan(plan.model, []))
    np.testing.assert_allclose([s.score for s in unmasked], 0.0, atol=1e-5)


def test_write_scores_jsonl(tmp_path):
    path = write_scores(tmp_path / "out" / "s.jsonl",
                        [InfluenceScore(0, 0.5, 1.0, 1.5), InfluenceScore(1, -0.1, 2.0, 1.8)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"index": 0, "score": 0.5, "dense_loss": 1.0, "masked_loss": 1.5},
                    {"index": 1, "score": -0.1, "dense_loss": 2.0, "masked_loss": 1.8}]
    assert [p.name for p in path.parent.iterdir()] == ["s.jsonl"]  # no temporary left


def test_auc():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 3], [2, 2]) == 0.5
    assert auc([2], [2]) == 0.5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence")
    _model().save_pretrained(root / "m")
    byte_tokenizer().save_pretrained(root / "m")
    rng = np.random.default_rng(0)
    with (root / "data.jsonl").open("w") as f:
        for i in range(3):
            prompt = " ".join(rng.choice(["alpha", "beta", "key", "is"], 40)) + f" key {i} is"
            f.write(json.dumps({"prompt": prompt, "response": f" {i}{i}{i}"}) + "\n")
    return root


def test_cli_writes_one_line_per_sample(checkpoint, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert main(["influence", "--model", str(checkpoint / "m"), "--data",
                 str(checkpoint / "data.jsonl"), "--heads", "2", "--score-lengths", "300",
                 "--score-samples", "1", "--window", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"index", "score", "dense_loss", "masked_loss"}
    assert "3 samples scored" in capsys.readouterr().out


def test_cli_errors_are_one_line(checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moaplan", "influence", "--model", str(checkpoint / "m"),
         "--data", str(tmp_path / "missing.jsonl"), "--heads", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "no calibration file" in result.stderr


def test_mask_plan_ranks_heads_by_a_given_profile(checkpoint, tmp_path):
    from moaplan.eval.data_influence import retrieval_mask_plan
    from moaplan.model import load_model
    from moaplan.profile import load_profile
    from moaplan.profile.compare import profile_rankings, top_heads

    scores = tmp_path / "induction.safetensors"
    assert main(["profile", "--model", str(checkpoint / "m"), "--scorer", "induction",
                 "--lengths", "64", "--samples", "1", "--block", "16", "--out", str(scores)]) == 0
    model, tokenizer = load_model(checkpoint / "m")
    plan = retrieval_mask_plan(model, tokenizer, 2, Rule.window(8, sink=4), scores=scores)
    ranking = next(iter(profile_rankings(load_profile(scores)).values()))
    assert {tuple(h) for h in plan.provenance["masked_heads"]} == set(top_heads(ranking, 2))
    assert sum(not r.full for r in plan.flat_rules) == 2
