"""Head scorers: the probe against eager attention, retrieval and echo/induction logic on
constructed cases, scores as a profile the optimizer reads, the comparison, the CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from moaplan.cli import main
from moaplan.data import CalibrationSample
from moaplan.errors import DataError, ProfileError
from moaplan.model import byte_tokenizer, load_model
from moaplan.optimize import solve
from moaplan.plan import Budget, ModelShape
from moaplan.profile import load_profile, profile_model, save_profile
from moaplan.profile.attention import profiling_attention
from moaplan.profile.compare import gradient_importance, overlaps, profile_rankings, top_heads
from moaplan.profile.influence import summarize_dense
from moaplan.profile.record import default_profile_path, metadata_path
from moaplan.profile.scorers import (
    FLOOR,
    HeadScores,
    RowProbe,
    copy_hits,
    copy_mass,
    echo_induction_score,
    entry_counts,
    head_scores,
    kv_head_max,
    profile_from_scores,
    score_profile,
)
from moaplan.rules import RuleSpace
from moaplan.search import SearchSettings, knapsack

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=259, max_position_embeddings=1024,
            bos_token_id=256, eos_token_id=257, pad_token_id=258)
SPACE = RuleSpace(sinks=(16,), alphas=(16, 32, 64), betas=(0.0, 0.25, 0.5))


def _tiny(kind=LlamaForCausalLM, config=LlamaConfig, seed=0):
    torch.manual_seed(seed)
    return kind(config(**TINY)).eval()


@pytest.mark.parametrize("kind,config", [(LlamaForCausalLM, LlamaConfig),
                                         (Qwen2ForCausalLM, Qwen2Config)])
def test_probe_rows_match_eager_weights_and_output_is_unchanged(kind, config, monkeypatch):
    # slabs of 10 rows (1 x 4 heads x 90 keys each), so the 37 probed rows take four
    monkeypatch.setattr("moaplan.profile.influence._SLAB_ELEMENTS", 3600)
    model = _tiny(kind, config)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, output_attentions=True).attentions
        model.set_attn_implementation("sdpa")
    seen = {}

    def observe(layer, r0, probs):
        seen.setdefault(layer, []).append((r0, probs.clone()))

    probe = RowProbe(40, 77, observe)
    with torch.no_grad(), profiling_attention(model, probe):
        probed = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(probed, dense, rtol=1e-5, atol=1e-5)
    for layer, slabs in seen.items():
        for r0, probs in slabs:
            rows = probs.shape[2]
            expected = eager[layer][:, :, r0:r0 + rows, :probs.shape[3]]
            torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)
        assert [p.shape[2] for _, p in slabs] == [10, 10, 10, 7]
    assert model.config._attn_implementation == "sdpa"


def test_copy_hits_counts_only_needle_keys_holding_the_generated_token():
    ids = [9, 9, 1, 2, 3, 9, 1, 2, 3, 0]
    needle = (2, 5)  # tokens 1 2 3 at positions 2, 3, 4
    generated = [1, 2, 3]
    argmax = np.array([
        [2, 3, 4],  # copies every step from the needle
        [6, 7, 8],  # the same tokens, but outside the needle
        [2, 2, 4],  # the second step looks at the wrong token
        [0, 1, 9],  # never
    ])
    np.testing.assert_array_equal(copy_hits(argmax, generated, ids, needle), [3, 0, 2, 0])


def test_copy_mass_reads_the_echo_and_induction_entries():
    half, n = 3, 7  # bos + x + x, second copy at rows 4, 5, 6
    probs = torch.zeros(1, 2, 3, n)
    for k, row in enumerate(range(4, 7)):
        probs[0, 0, k, row - half] = 1.0  # head 0: pure echo
        probs[0, 1, k, row - half + 1] = 0.75  # head 1: mostly induction
        probs[0, 1, k, 0] = 0.25
    mass = copy_mass(probs, 4, half) / half
    torch.testing.assert_close(mass, torch.tensor([[1.0, 0.0], [0.0, 0.75]]))


def test_echo_and_induction_of_uniform_attention():
    # Zero query weights make every head attend uniformly: row i puts 1 / (i + 1) on each key.
    model = _tiny()
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    half = 20
    ids = [256] + list(range(half)) * 2
    echo, induction = echo_induction_score(model, ids, half)
    expected = np.mean([1 / (i + 1) for i in range(len(ids) - half, len(ids))])
    np.testing.assert_allclose(echo, expected, rtol=1e-5)
    np.testing.assert_allclose(induction, expected, rtol=1e-5)


def test_kv_head_max_takes_the_group_max():
    scores = np.array([[0.1, 0.9, 0.3, 0.2]])
    np.testing.assert_array_equal(kv_head_max(scores, 2), [[0.9, 0.3]])


@pytest.mark.parametrize("length", [64, 70, 200])
def test_entry_counts_match_the_summary_of_all_ones(length):
    ones = torch.ones(1, 1, length, length, dtype=torch.float64).tril(-1)
    summary = summarize_dense(ones, 16, 3, 1)
    far, sink = entry_counts(length, 16, 3)
    np.testing.assert_array_equal(far, summary.far[0].numpy())
    np.testing.assert_array_equal(sink, summary.sink[0].numpy())
    assert far.sum() == length * (length - 1) / 2


def _hand_scores(values, lengths=(256, 512)):
    scores = np.asarray(values, dtype=np.float64)
    return HeadScores("retrieval", {"retrieval": {n: scores for n in lengths}},
                      dict.fromkeys(lengths, 2), "hand")


def test_profile_from_scores_prices_rules_by_score_and_keeps_the_retriever_wide():
    shape = ModelShape(2, 4, 2, 16, model_type="llama")
    scores = _hand_scores([[0.0, 0.9], [0.1, 0.0]])
    profile = profile_from_scores(shape, scores, block=16, rule_space=SPACE)
    weights = np.array([0.0, 0.9, 0.1, 0.0]) + FLOOR * 0.9
    for n in (256, 512):
        np.testing.assert_allclose(profile.total(n), weights)
        cost = profile.dropped_influence(SPACE.rules, n)
        assert cost[:, 0].max() == 0  # full drops nothing
        # every rule costs each head in proportion to its weight
        np.testing.assert_allclose(cost / weights[:, None],
                                   np.broadcast_to(cost[:1] / weights[0], cost.shape), rtol=1e-9)
    settings = SearchSettings(budget=Budget("kv", 0.4), lengths=[256, 512],
                              validation_length=384, rule_space=SPACE, block=16)
    choice = solve(knapsack(profile, settings), time_limit=10).choice
    kv = SPACE.density([512])[:, 0]
    assert kv[choice[1]] == kv[choice].max()  # the retrieval head keeps the widest rule
    assert kv[choice[1]] > kv[choice[0]]


def test_score_profile_shapes_metadata_and_files(tmp_path):
    model, tok = _tiny(), byte_tokenizer()
    profile = score_profile(model, tok, "induction", [64, 96], 2, block=16, rule_space=SPACE)
    assert profile.scorer == "induction" and profile.complete
    assert set(profile.head_scores) == {"echo", "induction"}
    assert np.asarray(profile.head_scores["echo"]).shape == (2, 2)
    assert profile.far(96).shape == (4, 6, 2) and profile.sink(96).shape == (4, 1, 6, 2)
    path = save_profile(profile, tmp_path / "p.safetensors")
    meta = yaml.safe_load(metadata_path(path).read_text())
    assert meta["scorer"] == "induction" and "echo" in meta["head_scores"]
    again = load_profile(path)
    assert again.scorer == "induction" and again.head_scores == profile.head_scores
    np.testing.assert_allclose(again.total(64), profile.total(64))
    # a file written before the scorer field existed is a gradient profile
    del meta["scorer"], meta["head_scores"]
    metadata_path(path).write_text(yaml.safe_dump(meta))
    old = load_profile(path)
    assert old.scorer == "gradient" and old.head_scores == {}


def test_retrieval_scores_of_a_random_model_and_short_lengths():
    model, tok = _tiny(), byte_tokenizer()
    scores = head_scores(model, tok, "retrieval", [300], 2)
    assert scores.scores["retrieval"][300].shape == (2, 2)
    assert ((scores.mean("retrieval") >= 0) & (scores.mean("retrieval") <= 1)).all()
    with pytest.raises(DataError, match="too short for a retrieval prompt"):
        head_scores(model, tok, "retrieval", [100], 1)
    with pytest.raises(ProfileError, match="unknown head scorer"):
        head_scores(model, tok, "gradient", [300], 1)


def test_reference_model_retrieval_heads_are_the_model_cards():
    model, tok = load_model()
    scores = head_scores(model, tok, "retrieval", [512], 2).mean("retrieval")
    assert top_heads(scores, 3) == {(5, 3), (6, 3), (7, 1)}  # MODEL_CARD.md's retrieval heads
    assert scores[6, 3] > 0.5


def test_rankings_and_overlaps():
    a = np.array([[3.0, 0.0], [2.0, 1.0]])
    b = np.array([[0.0, 5.0], [4.0, 0.0]])
    assert top_heads(a, 2) == {(0, 0), (1, 0)}
    assert top_heads(b, 3) == {(0, 1), (1, 0)}  # zero scores are never top heads
    [row] = overlaps({"a": a, "b": b}, 2)
    assert (row.first, row.second, row.common) == ("a", "b", 1)
    assert row.jaccard == pytest.approx(1 / 3)


def test_gradient_importance_ranks_a_gradient_profile():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(512, dtype=torch.bool)
    mask[400:] = True  # the response looks past 64 sinks + 256 recent keys
    samples = {512: [CalibrationSample(torch.randint(0, 256, (512,), generator=g), mask)]}
    profile = profile_model(model, samples, block=64)
    [(name, ranking)] = profile_rankings(profile).items()
    assert name == "gradient" and ranking.shape == (2, 2) and (ranking > 0).all()
    np.testing.assert_allclose(ranking, gradient_importance(profile))


def test_cli_scorer_profile_and_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model, tok = _tiny(), byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main(["profile", "--model", str(tmp_path / "m"), "--scorer", "induction",
                 "--lengths", "64", "--samples", "1", "--block", "16"]) == 0
    # the default path names the model by its config, as search's does
    out = default_profile_path(ModelShape.from_config(model.config), "induction")
    assert out.name.endswith("-induction.safetensors")
    assert load_profile(out).scorer == "induction"
    capsys.readouterr()
    assert main(["compare-scorers", "--profiles", str(out), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "| echo vs induction |" in text and "Jaccard" in text


@pytest.mark.parametrize("args,message", [
    (["profile", "--scorer", "retrieval", "--lengths", "512", "--data", "x.jsonl"],
     "builds its own inputs"),
    (["compare-scorers", "--profiles", "missing.safetensors"], "not found"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "moaplan", *args], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
