"""``apply``/``remove`` on tiny random Llama, Mistral and Qwen2 models (GQA: 4 heads, 2 KV)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AttentionInterface,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from moaplan.errors import ModelError, PlanError
from moaplan.plan import ModelShape, Plan, save_plan
from moaplan.rules import Rule
from moaplan.runtime import apply, remove

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),  # keeps its default sliding_window 4096
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, max_position_embeddings=256,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
GREEDY = dict(do_sample=False, pad_token_id=0)


def tiny_model(arch: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SHAPE, **overrides})).eval()


def make_plan(model, rules) -> Plan:
    return Plan(ModelShape.from_config(model.config), rules)


def full_plan(model) -> Plan:
    return make_plan(model, [[Rule.full_attention()] * 2 for _ in range(2)])


def sparse_plan(model, seed: int, *, elastic: bool = True) -> Plan:
    """Different small rules per (layer, KV head); ``elastic`` adds length-dependent spans."""
    rng = np.random.default_rng(seed)
    betas = (0.0, 0.25) if elastic else (0.0,)
    rules = [[Rule(sink=int(rng.integers(0, 4)), alpha=float(rng.integers(1, 6)),
                   beta=float(rng.choice(betas))) for _ in range(2)] for _ in range(2)]
    return make_plan(model, rules)


def brute_force_logits(model, plan: Plan, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Logits with each layer's rules as explicit per-head masks, built by looping over
    positions; query row ``i`` uses the rule at length ``lengths[i]``.  Eager softmax attention,
    independent of moaplan's runtime."""
    n = ids.shape[1]
    masks = []
    for layer_rules in plan.rules:
        mask = torch.zeros(len(layer_rules), n, n, dtype=torch.bool)
        for h, rule in enumerate(layer_rules):
            sink = 0 if rule.full else rule.sink
            for i in range(n):
                span = int(rule.span(lengths[i]))
                for j in range(i + 1):
                    mask[h, i, j] = j < sink or i - j < span
        masks.append(mask)

    def masked_eager(module, query, key, value, attention_mask, scaling=None, **_):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        mask = masks[module.layer_idx].repeat_interleave(group, 0)
        scores = (query @ key.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), None

    previous = model.config._attn_implementation
    AttentionInterface.register("moaplan_test_brute_force", masked_eager)
    model.set_attn_implementation("moaplan_test_brute_force")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


def ids_for(seed: int, batch: int, n: int) -> torch.Tensor:
    return torch.randint(1, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_plan_matches_sdpa_forward_and_generate(arch):
    model = tiny_model(arch)
    ids = ids_for(0, 2, 14)
    with torch.no_grad():
        want = model(ids).logits
        want_tokens = model.generate(ids, max_new_tokens=6, **GREEDY)
        apply(model, full_plan(model))
        got = model(ids).logits
        got_tokens = model.generate(ids, max_new_tokens=6, **GREEDY)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_plan_matches_brute_force(arch):
    model = tiny_model(arch)
    plan = sparse_plan(model, seed=len(arch))
    ids = ids_for(1, 2, 16)
    want = brute_force_logits(model, plan, ids, [16] * 16)
    apply(model, plan)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, brute_force_logits(model, full_plan(model), ids, [16] * 16))


@pytest.mark.filterwarnings("ignore:.*past_key_values.*is deprecated")
def test_decode_step_takes_spans_at_the_current_length():
    # Prefill of 15 tokens at span(15), then one cached step at span(16).
    model = tiny_model("llama")
    plan = sparse_plan(model, seed=3)
    assert any(rule.beta for layer in plan.rules for rule in layer)
    ids = ids_for(2, 1, 16)
    want = brute_force_logits(model, plan, ids, [15] * 15 + [16])[:, -1]
    apply(model, plan)
    with torch.no_grad():
        cache = model(ids[:, :15], use_cache=True).past_key_values
        got = model(ids[:, 15:], past_key_values=cache).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_with_fixed_windows_matches_brute_force_greedy():
    # With fixed windows (beta = 0) spans do not depend on the length, so cached decoding
    # must equal recomputing everything at each step.
    model = tiny_model("qwen2")
    plan = sparse_plan(model, seed=4, elastic=False)
    seq = ids_for(3, 1, 10)
    for _ in range(5):
        logits = brute_force_logits(model, plan, seq, [seq.shape[1]] * seq.shape[1])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    apply(model, plan)
    with torch.no_grad():
        got = model.generate(seq[:, :10], max_new_tokens=5, **GREEDY)
    assert torch.equal(got, seq)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(side):
    model = tiny_model("mistral")
    apply(model, sparse_plan(model, seed=5))
    lengths, width = [13, 7, 10], 13
    seqs = [ids_for(10 + i, 1, n)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(seqs):
        where = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[b, where], mask[b, where] = seq, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        for b, seq in enumerate(seqs):
            alone = model(seq[None]).logits[0]
            torch.testing.assert_close(batched[b][mask[b].bool()], alone, rtol=1e-5, atol=1e-5)
        if side == "left":  # generation pads on the left
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
            for b, seq in enumerate(seqs):
                alone = model.generate(seq[None], max_new_tokens=5, **GREEDY)
                assert torch.equal(tokens[b, width:], alone[0, len(seq):])


def test_static_cache_generate_matches_dynamic_cache_with_left_padding():
    # A static cache makes generate precompute masks through the registered mask function.
    model = tiny_model("llama")
    apply(model, sparse_plan(model, seed=6))
    ids, mask = ids_for(4, 2, 9), torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
        static = model.generate(ids, attention_mask=mask, max_new_tokens=4,
                                cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)


def test_apply_from_yaml_path_and_remove(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "plan.yaml"
    save_plan(full_plan(model), path)
    assert apply(model, path) is model
    assert model.config._attn_implementation.startswith("moaplan_")
    remove(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ModelError, match="no moaplan plan"):
        remove(model)


@pytest.mark.parametrize("shape", [dict(num_layers=3), dict(num_key_value_heads=4)])
def test_mismatched_plan_raises_plan_error(shape):
    model = tiny_model("llama")
    fields = dict(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    fields.update(shape)
    rules = [[Rule.full_attention()] * fields["num_key_value_heads"]] * fields["num_layers"]
    with pytest.raises(PlanError, match="the plan is for a model with"):
        apply(model, Plan(ModelShape(**fields), rules))


def test_unsupported_architecture_raises_model_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ModelError, match="supported architectures: llama, mistral, qwen2"):
        apply(model, full_plan(tiny_model("llama")))


def test_input_beyond_native_sliding_window_raises_model_error():
    model = tiny_model("mistral", sliding_window=8)
    apply(model, full_plan(model))
    with pytest.raises(ModelError, match="native sliding window"), torch.no_grad():
        model(ids_for(0, 1, 12))
