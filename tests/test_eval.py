"""Evaluation tasks: prompt construction, scoring, perplexity, heads map, the eval command."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moaplan.cli import eval as eval_cli
from moaplan.data.corpus import stdlib_corpus
from moaplan.data.tasks import TASKS, TaskSample
from moaplan.errors import DataError, ModelError
from moaplan.eval import kv_accuracy, passkey_accuracy, perplexity
from moaplan.eval.headmap import far_attention_share
from moaplan.eval.scoring import answers_correct
from moaplan.model import byte_tokenizer, load_model, reference_config


@pytest.fixture(scope="module")
def reference():
    return load_model()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = reference_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_samples_have_exact_length_and_hold_their_answer(task):
    tok, corpus = byte_tokenizer(), stdlib_corpus("heldout")
    starts = []
    for depth in (0.0, 0.5, 1.0):
        s = TASKS[task](tok, corpus, 700, depth, np.random.default_rng(1))
        assert len(s.input_ids) == 700 and s.input_ids[0] == tok.bos_token_id
        answer = tok.decode(s.answer_ids).strip()
        assert len(answer) == 5 and answer.isdigit()
        assert answer in tok.decode(s.input_ids[slice(*s.needle)])
        starts.append(s.needle[0])
    assert starts[0] > 64 and starts == sorted(starts)  # depth 0 lies beyond 64 sinks
    again = TASKS[task](tok, corpus, 700, 1.0, np.random.default_rng(1))
    assert again == s


def test_too_short_length_is_a_data_error():
    with pytest.raises(DataError, match="too short"):
        TASKS["kv"](byte_tokenizer(), stdlib_corpus("heldout"), 300, 0.5,
                    np.random.default_rng(0))


def test_scoring_matches_greedy_decoding(reference):
    model, tok = reference
    sample = TASKS["passkey"](tok, stdlib_corpus("heldout"), 512, 0.5, np.random.default_rng(3))
    prompt = torch.tensor([sample.input_ids[: sample.answer_start]])
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=len(sample.answer_ids))
    assert greedy[0, prompt.shape[1]:].tolist() == sample.answer_ids
    wrong = list(sample.input_ids)
    wrong[-2] = ord("0") if wrong[-2] != ord("0") else ord("1")
    corrupted = TaskSample(wrong, sample.answer_start, sample.depth, sample.needle)
    assert answers_correct(model, [sample, corrupted], batch_size=2) == [True, False]


def test_reference_model_retrieves_dense_and_fails_unseen_needles_under_a_window(reference):
    model, tok = reference
    dense = passkey_accuracy(model, tok, lengths=(1024,), depths=(0.0, 1.0), samples=1)
    assert dense.accuracy() == 1.0
    from moaplan.plan import Budget, ModelShape, uniform_plan
    from moaplan.runtime import apply, remove

    plan = uniform_plan(ModelShape.from_config(model.config), Budget("kv", 0.5), [512])
    apply(model, plan)
    try:
        sparse = passkey_accuracy(model, tok, lengths=(512,), depths=(0.0, 1.0), samples=1)
    finally:
        remove(model)
    assert [c.accuracy for c in sparse.cells] == [0.0, 1.0]  # depth 0 is out of the window


def test_results_are_deterministic_and_serialisable(tiny_model):
    tok = byte_tokenizer()
    runs = [kv_accuracy(tiny_model, tok, lengths=(512,), depths=(0.25, 0.75), samples=2, seed=5)
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].cells) == 2
    record = json.loads(json.dumps(runs[0].to_dict()))
    assert record["task"] == "kv" and record["cells"][0]["total"] == 2
    assert runs[0].table().count("\n") == 2  # header, rule, one length


def test_perplexity_is_the_mean_token_nll(tiny_model):
    tok = byte_tokenizer()
    result = perplexity(tiny_model, tok, lengths=(256,), samples=2, seed=1)
    cell = result.cells[0]
    assert cell.tokens == 2 * 255
    # the untrained byte model is close to uniform over its 259 tokens
    assert 100 < cell.perplexity < 600
    assert result == perplexity(tiny_model, tok, lengths=(256,), samples=2, seed=1)


def test_head_map_matches_attention_weights(tiny_model):
    tok = byte_tokenizer()
    head_map = far_attention_share(tiny_model, tok, length=384, far=128, sink=16,
                                   depths=(0.0,), samples=1, answer_queries=8)
    assert head_map.answer.shape == (2, 2) and tiny_model.config._attn_implementation == "sdpa"
    sample = TASKS["passkey"](tok, stdlib_corpus("heldout"), 384, 0.0,
                              np.random.default_rng([0, 384, 128]))
    tiny_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tiny_model(input_ids=torch.tensor([sample.input_ids]), output_attentions=True)
    finally:
        tiny_model.set_attn_implementation("sdpa")
    weights = out.attentions[1][0]  # layer 1: [heads, N, N]
    i, j = np.arange(376, 384)[:, None], np.arange(384)[None, :]
    keep = torch.from_numpy(((i - j) >= 128) & (j >= 16))
    expected = (weights[:, 376:, :] * keep).sum(-1).mean(-1).view(2, 2).mean(-1)
    np.testing.assert_allclose(head_map.answer[1], expected.numpy(), rtol=1e-4, atol=1e-6)


def _cli(argv):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.run(args)


def test_eval_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _cli(["--task", "passkey", "--lengths", "512", "--depths", "1", "--samples", "2",
                 "--out", str(out)]) == 0
    assert "| 512 | 1.00 | 1.00 |" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["accuracy"] == 1.0 and record["plan"] is None


def test_eval_command_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        _cli(["--task", "passkey", "--depths", "1.5"])
    with pytest.raises(ModelError):
        _cli(["--task", "ppl", "--model", str(tmp_path)])
