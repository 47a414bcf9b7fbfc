"""``apply``/``remove`` on tiny random Llama, Mistral (native window 12) and Qwen2 models (GQA:
4 heads, 2 KV); the other families are in test_architectures.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import brute_force_logits, full_plan, ids_for, sparse_plan, tiny_model

from moaplan.errors import ModelError, PlanError
from moaplan.plan import ModelShape, Plan, save_plan
from moaplan.rules import Rule
from moaplan.runtime import apply, remove
from moaplan.runtime.cache import cache_keyword

ARCHS = ("llama", "mistral", "qwen2")
GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ARCHS)
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


@pytest.mark.parametrize("arch", ARCHS)
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


def test_repeated_apply_and_remove_leave_no_state():
    # transformers' registries end as the first apply left them (the same function under the
    # same names), and remove takes moaplan's attention off every module
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def registries() -> tuple[dict, dict]:
        return (dict(AttentionInterface._global_mapping),
                dict(AttentionMaskInterface._global_mapping))

    model = tiny_model("llama")
    plan = full_plan(model)
    remove(apply(model, plan))
    before = registries()
    for _ in range(3):
        apply(model, plan)
        apply(model, plan)  # a second plan replaces the first; one remove undoes both
        remove(model)
    assert registries() == before
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(module, "_moaplan_attention") for module in model.modules())


@pytest.mark.parametrize("shape", [dict(num_layers=3), dict(num_key_value_heads=4)])
def test_mismatched_plan_raises_plan_error(shape):
    model = tiny_model("llama")
    fields = dict(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    fields.update(shape)
    rules = [[Rule.full_attention()] * fields["num_key_value_heads"]] * fields["num_layers"]
    with pytest.raises(PlanError, match="the plan is for a model with"):
        apply(model, Plan(ModelShape(**fields), rules))


def test_decode_past_the_native_window_in_a_dense_cache_raises_model_error():
    # transformers' own cache drops a local layer's oldest slots, so the real-token positions
    # of what is left are lost; a MoaplanCache keeps them (what generate under a plan uses).
    model = tiny_model("mistral", sliding_window=8)
    apply(model, full_plan(model))
    with torch.no_grad():
        cache = model(ids_for(0, 1, 12), use_cache=True).past_key_values
        with pytest.raises(ModelError, match="sliding window"):
            model(ids_for(1, 1, 1), **{cache_keyword(model): cache})


def test_a_custom_4d_mask_is_refused_not_misread():
    # Two packed documents: the second may not see the first.  transformers hands a 4D mask
    # to the attention unchanged, and a plan cannot honour it.
    model = tiny_model("llama")
    apply(model, full_plan(model))
    n = 10
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    doc = torch.arange(n) >= 6
    packed = (causal & (doc[:, None] == doc[None, :]))[None, None]
    with pytest.raises(ModelError, match="custom 4D mask"), torch.no_grad():
        model(ids_for(0, 1, n), attention_mask=packed)
    with torch.no_grad():  # the plain causal mask, given as 4D, is what a plan assumes
        as_4d = model(ids_for(0, 1, n), attention_mask=causal[None, None]).logits
        torch.testing.assert_close(as_4d, model(ids_for(0, 1, n)).logits)
    restart = torch.cat([torch.arange(6), torch.arange(4)])[None]
    with pytest.raises(ModelError, match="packed documents"), torch.no_grad():
        model(ids_for(0, 1, n), position_ids=restart, use_cache=False)


def test_save_pretrained_keeps_the_plan_beside_the_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2")
    apply(model, sparse_plan(model, seed=7))
    model.save_pretrained(tmp_path)
    reloaded = apply(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    ids = ids_for(5, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelError, match="none saved beside the model"):
        apply(tiny_model("qwen2"))
