"""The profiler on tiny random transformers models: against an autograd oracle, checkpointing,
files, resume, refusal of another model, several processes, the plot."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from moaplan.errors import DataError, ProfileError
from moaplan.plan import ModelShape
from moaplan.profile import (
    Profile,
    checkpoint_path,
    load_profile,
    profile_model,
    save_profile,
    show_profile,
)
from moaplan.profile.attention import profiling_attention
from moaplan.profile.influence import EPS, summarize_dense
from moaplan.profile.profiler import response_loss, token_objective
from moaplan.rules import Rule, RuleSpace

BLOCK = 16
SPACE = RuleSpace(sinks=(16, 32), alphas=(16, 32, 48), betas=(0.0, 0.25))
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@dataclasses.dataclass
class Sample:
    input_ids: torch.Tensor
    response_mask: torch.Tensor


def _model(kind=LlamaForCausalLM, config=LlamaConfig, seed=0, **extra):
    torch.manual_seed(seed)
    return kind(config(**{**SMALL, **extra})).eval()


def _samples(lengths=(48, 70), per_length=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in lengths:
        out[n] = []
        for _ in range(per_length):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[n // 3:] = True
            out[n].append(Sample(torch.randint(0, 64, (n,), generator=g), mask))
    return out


def _oracle(model, samples, num_sink, objective):
    """Sums of the per-query-head summaries from an eager attention whose probabilities A are
    autograd leaves of the graph: dL/dA = G, D_i = sum_k G_ik A_ik, E = -A (G - D) / (1 - A +
    EPS)."""
    seen: list[tuple[int, torch.Tensor]] = []

    def eager(module, q, k, v, mask, scaling=None, **kwargs):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        n = q.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        a = torch.softmax((q @ k.transpose(-1, -2) * scaling).masked_fill(~causal, -torch.inf),
                          -1)
        a.retain_grad()
        seen.append((module.layer_idx, a))
        return (a @ v).transpose(1, 2).contiguous(), None

    hq = model.config.num_attention_heads
    sums = {}
    with profiling_attention(model, eager):
        model.requires_grad_(False)
        for n, group in samples.items():
            far = np.zeros((model.config.num_hidden_layers * hq, -(-n // BLOCK), 2))
            sink = np.zeros((far.shape[0], num_sink, far.shape[1], 2))
            for sample in group:
                seen.clear()
                loss, _ = response_loss(model, sample, objective)
                loss.backward()
                for layer, a in seen:
                    a64, g = a.detach().double(), a.grad.double()
                    e = -a64 * (g - (g * a64).sum(-1, keepdim=True)) / (1 - a64 + EPS)
                    s = summarize_dense(e, BLOCK, num_sink, hq)
                    far[layer * hq:(layer + 1) * hq] += s.far.numpy()
                    sink[layer * hq:(layer + 1) * hq] += s.sink.numpy()
            sums[n] = (far, sink)
    model.requires_grad_(True)
    return sums


@pytest.mark.parametrize("kind,config,objective", [
    (LlamaForCausalLM, LlamaConfig, "log_odds"), (Qwen2ForCausalLM, Qwen2Config, "log_odds"),
    (MistralForCausalLM, MistralConfig, "log_odds"), (LlamaForCausalLM, LlamaConfig,
                                                      "cross_entropy")])
def test_profile_matches_autograd_oracle(kind, config, objective):
    model = _model(kind, config)
    samples = _samples()
    profile = profile_model(model, samples, block=BLOCK, rule_space=SPACE, objective=objective)
    oracle = _oracle(model, samples, num_sink=2, objective=objective)
    kv, group = profile.num_heads, profile.model.group_size
    for n, (far, sink) in oracle.items():
        assert profile.finished[n] == 2
        np.testing.assert_allclose(profile.query_far_sum[n], far, rtol=2e-4, atol=1e-9)
        np.testing.assert_allclose(profile.query_sink_sum[n], sink, rtol=2e-4, atol=1e-9)
        np.testing.assert_allclose(profile.far_sum[n], far.reshape(kv, group, -1, 2).sum(1),
                                   rtol=2e-4, atol=1e-9)
        np.testing.assert_allclose(profile.sink_sum[n],
                                   sink.reshape(kv, group, 2, -1, 2).sum(1), rtol=2e-4, atol=1e-9)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert all(p.requires_grad for p in model.parameters())


def test_checkpointing_gives_the_same_profile():
    model = _model()
    samples = _samples(lengths=(40,), per_length=1)
    plain = profile_model(model, samples, block=BLOCK, rule_space=SPACE)
    ckpt = profile_model(model, samples, block=BLOCK, rule_space=SPACE,
                         gradient_checkpointing=True)
    np.testing.assert_allclose(ckpt.far_sum[40], plain.far_sum[40], rtol=1e-5)
    assert not model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_cost_matrix_shape_and_full_rule():
    model = _model()
    profile = profile_model(model, _samples(lengths=(64,), per_length=1), block=BLOCK,
                            rule_space=SPACE)
    cost = profile.dropped_influence(SPACE.rules, 64)
    assert cost.shape == (4, len(SPACE))
    assert np.all(cost[:, 0] == 0) and np.all(cost >= 0)
    narrow = profile.dropped_influence([Rule.window(16, sink=16)], 64)[:, 0]
    assert np.all(narrow <= profile.total(64) + 1e-12)
    with pytest.raises(ProfileError, match="not profiled"):
        profile.dropped_influence(SPACE.rules, 128)


def test_save_load_roundtrip_and_yaml(tmp_path):
    model = _model()
    profile = profile_model(model, _samples(per_length=1), block=BLOCK, rule_space=SPACE)
    path = save_profile(profile, tmp_path / "p.safetensors")
    meta = yaml.safe_load((tmp_path / "p.profile.yaml").read_text())
    assert meta["model"]["fingerprint"] == ModelShape.from_config(model.config).fingerprint
    assert meta["lengths"] == [48, 70] and meta["block"] == BLOCK
    assert meta["samples"] == {48: 1, 70: 1} and meta["calibration_hash"]
    assert meta["rule_space"]["sinks"] == [16, 32] and meta["moaplan_version"]
    back = load_profile(path)
    assert back.model == profile.model and back.rule_space == SPACE
    np.testing.assert_array_equal(back.far(70), profile.far(70))
    np.testing.assert_array_equal(back.dropped_influence(SPACE.rules, 48),
                                  profile.dropped_influence(SPACE.rules, 48))
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ProfileError, match="does not match"):
        load_profile(path)
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.safetensors")


def test_resume_continues_after_interruption(tmp_path):
    model = _model()
    samples = _samples(per_length=2)
    out = tmp_path / "p.safetensors"
    whole = profile_model(model, samples, block=BLOCK, rule_space=SPACE)

    def interrupt_after_three(progress):
        interrupt_after_three.calls += 1
        if interrupt_after_three.calls == 3:
            raise KeyboardInterrupt

    interrupt_after_three.calls = 0
    with pytest.raises(KeyboardInterrupt):
        profile_model(model, samples, block=BLOCK, rule_space=SPACE, checkpoint=out,
                      on_sample=interrupt_after_three)
    partial = load_profile(checkpoint_path(out))
    assert partial.finished == {48: 2, 70: 1} and not partial.complete
    done = []
    resumed = profile_model(model, samples, block=BLOCK, rule_space=SPACE, checkpoint=out,
                            resume=True, on_sample=done.append)
    assert [(p.length, p.sample) for p in done] == [(70, 1)]
    for n in samples:
        np.testing.assert_allclose(resumed.far_sum[n], whole.far_sum[n], rtol=1e-6)
    with pytest.raises(ProfileError, match="another model"):
        profile_model(_model(num_hidden_layers=3), samples, block=BLOCK, rule_space=SPACE,
                      checkpoint=out, resume=True)


def test_shorter_samples_fill_the_first_block_distances():
    model = _model()
    long, short = _samples(lengths=(40,), per_length=1)[40][0], _samples(lengths=(23,))[23][0]
    mixed = profile_model(model, {40: [long, short]}, block=BLOCK, rule_space=SPACE)
    alone = profile_model(model, {40: [long], 23: [short]}, block=BLOCK, rule_space=SPACE)
    expected = alone.far_sum[40].copy()
    expected[:, :2] += alone.far_sum[23]
    np.testing.assert_allclose(mixed.far_sum[40], expected, rtol=1e-6)
    with pytest.raises(DataError, match="expected"):
        profile_model(model, {20: [long]}, block=BLOCK, rule_space=SPACE)


def test_rule_space_sinks_must_be_whole_blocks():
    with pytest.raises(ProfileError, match="multiple of the block"):
        profile_model(_model(), _samples(per_length=1), block=BLOCK,
                      rule_space=RuleSpace(sinks=(4,)))


def test_show_profile_writes_png(tmp_path):
    profile = profile_model(_model(), _samples(per_length=1), block=BLOCK, rule_space=SPACE)
    path = save_profile(profile, tmp_path / "p.safetensors")
    png = show_profile(path, tmp_path / "p.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    profile = profile_model(_model(), _samples(lengths=(40,), per_length=3), block=BLOCK,
                            rule_space=SPACE)
    if rank == 0:
        save_profile(profile, out)
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    out = tmp_path / "dist.safetensors"
    torch.multiprocessing.spawn(_worker, args=(2, f"file://{tmp_path}/rendezvous", str(out)),
                                nprocs=2, join=True)
    single = profile_model(_model(), _samples(lengths=(40,), per_length=3), block=BLOCK,
                           rule_space=SPACE)
    both = load_profile(out)
    assert both.finished == {40: 3} and both.has_query_heads
    np.testing.assert_allclose(both.far_sum[40], single.far_sum[40], rtol=1e-5)
    np.testing.assert_allclose(both.query_far_sum[40], single.query_far_sum[40], rtol=1e-5)


_TRITON_BACKEND_SCRIPT = r"""
import json, sys, numpy as np
sys.path.insert(0, "tests")
from test_profile import BLOCK, SPACE, _model, _samples
from moaplan.profile import profile_model
model, samples = _model(), _samples(lengths=(40,), per_length=1)
fused = profile_model(model, samples, block=BLOCK, rule_space=SPACE, backend="triton")
plain = profile_model(model, samples, block=BLOCK, rule_space=SPACE, backend="torch")
print(json.dumps(float(np.abs(fused.far_sum[40] - plain.far_sum[40]).max()
                       / np.abs(plain.far_sum[40]).max())))
"""


def test_triton_backend_equals_torch_backend_under_interpreter():
    """The GPU path (SDPA + Triton lse + Triton summary) on a model, run by the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_BACKEND_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5


def test_cli_profiles_the_reference_model_on_a_text_file(tmp_path, capsys):
    from moaplan.cli import main

    text = tmp_path / "calibration.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    out = tmp_path / "ref.safetensors"
    assert main(["profile", "--data", str(text), "--lengths", "128", "--samples", "2",
                 "--out", str(out)]) == 0
    profile = load_profile(out)
    assert profile.finished == {128: 2} and profile.model.num_layers == 8
    assert not checkpoint_path(out).exists()
    assert main(["profile", "--data", str(tmp_path / "missing.txt"), "--lengths", "128",
                 "--out", str(out)]) == 2
    assert "no calibration file" in capsys.readouterr().err


def test_profile_record_rejects_bad_shapes():
    shape = ModelShape(1, 2, 2, 8)
    with pytest.raises(ProfileError, match="wrong shape"):
        Profile(model=shape, block=16, lengths=[32], samples={32: 1},
                far_sum={32: np.zeros((2, 3, 2))})


def test_query_heads_summaries_round_trip_and_sum_to_the_kv_heads(tmp_path):
    shape = ModelShape(2, 4, 2, 8)
    rng = np.random.default_rng(0)
    profile = Profile(model=shape, block=16, lengths=[32, 64], samples={32: 1, 64: 1},
                      rule_space=SPACE)
    assert profile.has_query_heads  # a fresh profile is per query head until told otherwise
    for n in (32, 64):
        profile.add(n, rng.random((8, n // 16, 2)), rng.random((8, 2, n // 16, 2)),
                    per_query_head=True)
    loaded = load_profile(save_profile(profile, tmp_path / "p.safetensors"))
    assert loaded.has_query_heads
    np.testing.assert_array_equal(loaded.query_far(64), profile.query_far_sum[64])
    np.testing.assert_allclose(loaded.far(64), loaded.query_far(64).reshape(4, 2, -1, 2).sum(1))
    # a sample without query heads (a head scorer's) ends them, and nothing else
    loaded.add(32, loaded.far_sum[32], loaded.sink_sum[32])
    assert not loaded.has_query_heads and loaded.finished[32] == 2
    with pytest.raises(ProfileError, match="no per-query-head summaries"):
        loaded.query_far(32)
    again = load_profile(save_profile(loaded, tmp_path / "q.safetensors"))
    assert not again.has_query_heads
    with pytest.raises(ProfileError, match="do not match the KV heads"):
        Profile(model=shape, block=16, lengths=[32], samples={32: 1}, rule_space=SPACE,
                finished={32: 1}, far_sum={32: np.ones((4, 2, 2))},
                sink_sum={32: np.ones((4, 2, 2, 2))},
                query_far_sum={32: np.ones((8, 2, 2))},
                query_sink_sum={32: np.ones((8, 2, 2, 2))})


def test_log_odds_objective_is_the_negative_log_odds_and_does_not_saturate():
    logits = torch.tensor([[9.0, 0.0, -1.0], [0.5, 0.2, 0.1]], dtype=torch.float64,
                          requires_grad=True)
    targets = torch.tensor([0, 2])
    p = logits.softmax(-1)[torch.arange(2), targets]
    expected = -torch.log(p / (1 - p)).mean()
    value = token_objective(logits, targets, "log_odds")
    torch.testing.assert_close(value, expected)
    # A confident token: cross-entropy's gradient all but vanishes, log-odds' does not.
    (ce_grad,) = torch.autograd.grad(token_objective(logits[:1], targets[:1], "cross_entropy"),
                                     logits)
    (lo_grad,) = torch.autograd.grad(token_objective(logits[:1], targets[:1], "log_odds"),
                                     logits)
    assert ce_grad.abs().max() < 1e-3 and lo_grad[0, 0] == pytest.approx(-1.0)
    with pytest.raises(ProfileError, match="unknown profiling objective"):
        token_objective(logits, targets, "accuracy")
