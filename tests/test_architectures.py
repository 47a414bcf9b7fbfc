"""A plan on tiny random models of thirteen architecture families, found by capability (their
attention goes through ``AttentionInterface``), not by name: an all-full plan equals the
model's own attention; a sparse elastic plan equals an independent per-head mask (which
honours the soft-capping and local windows the model passes); cached decoding through a
MoaplanCache equals a full forward under the same rules; a left-padded batch equals each
sequence alone.  A model whose attention does not route through the interface (Falcon) is
refused before any work."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    ARCHS,
    WINDOW,
    brute_force_logits,
    full_plan,
    ids_for,
    sparse_plan,
    tiny_model,
)
from transformers import FalconConfig, FalconForCausalLM

from moaplan.errors import ModelError
from moaplan.runtime import MoaplanCache, apply
from moaplan.runtime.apply import check_attention_routing
from moaplan.runtime.cache import cache_keyword

LENGTH = WINDOW + 8  # past the local layers' native window


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param


def test_all_full_plan_equals_the_models_own_attention(arch):
    model = tiny_model(arch)
    ids = ids_for(0, 2, LENGTH)
    with torch.no_grad():
        want = model(ids).logits
        apply(model, full_plan(model))
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sparse_plan_equals_an_independent_mask(arch):
    model = tiny_model(arch)
    plan = sparse_plan(model, seed=len(arch))
    ids = ids_for(1, 2, LENGTH)
    want = brute_force_logits(model, plan, ids, [LENGTH] * LENGTH)
    apply(model, plan)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, brute_force_logits(model, full_plan(model), ids,
                                                      [LENGTH] * LENGTH), atol=1e-4)


def test_cached_decode_equals_a_full_forward(arch):
    # Prefill at span(P), then each decode step at span(P + t): row i of the oracle uses the
    # rule at length max(P, i + 1).
    model = tiny_model(arch)
    plan = sparse_plan(model, seed=2 + len(arch))
    prefill, steps = LENGTH - 5, 5
    ids = ids_for(2, 1, LENGTH)
    want = brute_force_logits(model, plan, ids, [max(prefill, i + 1) for i in range(LENGTH)])
    apply(model, plan)
    cache = MoaplanCache(plan, 1, LENGTH)
    key = cache_keyword(model)
    with torch.no_grad():
        got = [model(ids[:, :prefill], **{key: cache}).logits[:, -1]]
        for t in range(prefill, prefill + steps - 1):
            got.append(model(ids[:, t:t + 1], **{key: cache}).logits[:, -1])
    torch.testing.assert_close(torch.stack(got, 1), want[:, prefill - 1:LENGTH - 1],
                               rtol=1e-5, atol=1e-5)


def test_left_padding_equals_each_sequence_alone(arch):
    model = tiny_model(arch)
    apply(model, sparse_plan(model, seed=5))
    lengths, width = [LENGTH, 9, 15], LENGTH
    seqs = [ids_for(10 + i, 1, n)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(seqs):
        ids[b, width - len(seq):], mask[b, width - len(seq):] = seq, 1
    greedy = dict(do_sample=False, pad_token_id=0, max_new_tokens=4)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask,
                        position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        tokens = model.generate(ids, attention_mask=mask, **greedy)
        for b, seq in enumerate(seqs):
            torch.testing.assert_close(batched[b][mask[b].bool()], model(seq[None]).logits[0],
                                       rtol=1e-5, atol=1e-5)
            alone = model.generate(seq[None], **greedy)
            assert torch.equal(tokens[b, width:], alone[0, len(seq):])


def test_a_model_whose_attention_bypasses_the_interface_is_refused_up_front():
    config = FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, bos_token_id=None, eos_token_id=None)
    with pytest.raises(ModelError, match="FalconForCausalLM does not compute attention through"):
        check_attention_routing(config)
    model = FalconForCausalLM(config).eval()
    with pytest.raises(ModelError, match="AttentionInterface"):
        apply(model, full_plan(tiny_model("llama")))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch,fields", [
    ("llama", dict(head_dim=64)), ("llama", dict(head_dim=128)),
    ("llama", dict(head_dim=256)), ("llama", dict(head_dim=96)), ("llama", dict(head_dim=80)),
    ("gemma2", {}), ("gemma3", dict(head_dim=256)), ("mistral", {})])
def test_cuda_runs_what_the_cpu_runs(arch, fields):
    # On a GPU: the Triton kernels where they apply, the torch path (with a warning) for a
    # head_dim, a native window or soft-capping they do not implement; fp32, so the results
    # match the CPU's closely.
    import warnings

    model = tiny_model(arch, **fields)
    plan = sparse_plan(model, seed=9)
    apply(model, plan)
    ids = ids_for(6, 2, LENGTH)
    greedy = dict(do_sample=False, pad_token_id=0, max_new_tokens=6)
    with torch.no_grad():
        want, want_tokens = model(ids).logits, model.generate(ids, **greedy)
        model.cuda()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torch path's warning, where it runs
            got = model(ids.cuda()).logits.cpu()
            got_tokens = model.generate(ids.cuda(), **greedy).cpu()
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    assert torch.equal(got_tokens, want_tokens)
