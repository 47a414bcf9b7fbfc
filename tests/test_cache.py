"""MoaplanCache on tiny random Llama models: greedy ``generate`` through the compressed cache
gives the same tokens as the dense path (DynamicCache + the plan's masked attention), for
single prompts, a left-padded batch, right padding and a multi-turn chat, with and without
compensation tokens; its memory matches ``kv_bytes``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from moaplan.errors import ModelError
from moaplan.kernels.layout import slot_positions
from moaplan.plan import ModelShape, Plan
from moaplan.rules import Rule
from moaplan.runtime import apply
from moaplan.runtime import cache as cache_module
from moaplan.runtime.cache import MoaplanCache, cache_keyword
from moaplan.runtime.memory import kv_bytes

LAYERS, KV_HEADS = 3, 2
CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=KV_HEADS, vocab_size=97,
              max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
GREEDY = dict(do_sample=False, pad_token_id=0)


def mixed_plan(config, compensate: bool) -> Plan:
    """Mixed heads: elastic windows with sinks, a fixed window without sinks, full attention;
    with ``compensate``, every head but the last layer's window has a compensation token."""
    rng = np.random.default_rng(1)
    rules = [[Rule(sink=int(rng.integers(1, 4)), alpha=float(rng.integers(2, 6)), beta=0.25,
                   compensate=compensate),
              Rule(alpha=float(rng.integers(3, 8)), compensate=compensate)]
             for _ in range(LAYERS - 1)]
    rules.append([Rule.full_attention(), Rule(sink=2, alpha=3.0, beta=0.125)])
    return Plan(ModelShape.from_config(config), rules)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "compensate"])
def model_and_plan(request):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    plan = mixed_plan(model.config, request.param)
    apply(model, plan)
    return model, plan


def prompt(seed: int, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, CONFIG["vocab_size"], (1, n), generator=gen)


def generate(model, ids, new, cache=None, mask=None) -> torch.Tensor:
    if mask is None:
        mask = torch.ones_like(ids)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new,
                              **{cache_keyword(model): cache}, **GREEDY)


@pytest.mark.parametrize("seed,length", [(0, 9), (1, 30), (2, 57)])
def test_generate_matches_dense(model_and_plan, seed, length):
    model, plan = model_and_plan
    ids, new = prompt(seed, length), 14
    dense = generate(model, ids, new, DynamicCache())
    cache = MoaplanCache(plan, 1, length + new)
    compressed = generate(model, ids, new, cache)
    assert torch.equal(dense, compressed)
    assert cache.get_seq_length() == length + new - 1


def test_applied_plans_generate_through_their_compressed_cache(model_and_plan):
    model, plan = model_and_plan
    ids, new = prompt(5, 33), 9
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             return_dict_in_generate=True, **GREEDY)
    assert isinstance(out.past_key_values, MoaplanCache)
    assert out.past_key_values.max_length == 33 + new
    assert torch.equal(out.sequences, generate(model, ids, new, DynamicCache()))


def check_left_padded_batch(model, plan, device: str = "cpu") -> None:
    """A left-padded batch through a MoaplanCache generates what each prompt generates alone
    through a DynamicCache (the plan's masked dense path)."""
    prompts = [prompt(10 + i, n)[0].to(device) for i, n in enumerate((23, 8, 41))]
    width, new = max(len(p) for p in prompts), 12
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    cache = MoaplanCache(plan, len(prompts), width + new, device=device)
    out = generate(model, ids, new, cache, mask)
    for b, p in enumerate(prompts):
        alone = generate(model, p[None], new, DynamicCache())
        assert torch.equal(out[b, width:], alone[0, len(p):]), f"sequence {b}"


def test_left_padded_batch_matches_each_prompt_alone(model_and_plan):
    check_left_padded_batch(*model_and_plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compensate", [False, True])
def test_cuda_cache_matches_dense(compensate):
    # The CUDA path in fp32: prefill kernel, one-launch decode write, split-KV decode kernel
    # (head_dim 32: the kernels' smallest).
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG | dict(hidden_size=128))).eval().cuda()
    plan = mixed_plan(model.config, compensate)
    apply(model, plan)
    check_left_padded_batch(model, plan, "cuda")
    ids, new = prompt(3, 45).cuda(), 20
    cache = MoaplanCache(plan, 1, 45 + new, device="cuda")
    assert torch.equal(generate(model, ids, new, cache), generate(model, ids, new, DynamicCache()))


def decode_logits(model, cache, ids, mask, steps) -> list[torch.Tensor]:
    """Prefill ``ids`` then feed ``steps`` ([B, T]) one token at a time; last-token logits."""
    logits = []
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_keyword(model): cache})
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = mask.sum(1, keepdim=True) - 1
            out = model(steps[:, t:t + 1], attention_mask=mask, position_ids=pos,
                        **{cache_keyword(model): cache})
            logits.append(out.logits[:, -1])
    return logits


def test_right_padding_forward(model_and_plan):
    """Right-padded prefill then decode steps: each sequence's logits equal its own run."""
    model, plan = model_and_plan
    lengths, steps = (17, 6), 3
    seqs = [prompt(20 + i, n + steps)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n], mask[b, :n] = seqs[b][:n], 1
    tail = torch.stack([s[n:] for s, n in zip(seqs, lengths)])
    batched = decode_logits(model, MoaplanCache(plan, 2, width + steps), ids, mask, tail)
    for b, n in enumerate(lengths):
        alone = decode_logits(model, DynamicCache(), seqs[b][None, :n],
                              torch.ones(1, n, dtype=torch.long), tail[b:b + 1])
        for t in range(steps):
            torch.testing.assert_close(batched[t][b], alone[t][0], rtol=1e-4, atol=1e-4)


def test_multi_turn_matches_dense(model_and_plan):
    model, plan = model_and_plan
    first, second, new = prompt(30, 25), prompt(31, 16), 10
    total = 25 + new + 16 + new
    dense_cache, cache = DynamicCache(), MoaplanCache(plan, 1, total)
    outs = []
    for kv in (dense_cache, cache):
        turn1 = generate(model, first, new, kv)
        turn2 = generate(model, torch.cat([turn1, second], 1), new, kv)
        outs.append(turn2)
    assert torch.equal(outs[0], outs[1])


def test_compensation_changes_the_logits_the_cache_reproduces(model_and_plan):
    """Through the cache (multi-token prefill, then decode steps that evict), a compensating
    plan gives the dense path's logits, and they differ from the same plan without tokens."""
    model, plan = model_and_plan
    if not any(r.compensate for r in plan.flat_rules):
        pytest.skip("needs the compensating plan")
    ids, tail = prompt(60, 30), prompt(61, 6)
    mask = torch.ones_like(ids)
    dense = decode_logits(model, DynamicCache(), ids, mask, tail)
    cached = decode_logits(model, MoaplanCache(plan, 1, 36), ids, mask, tail)
    for a, b in zip(dense, cached):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    plain = Plan(plan.model, [[dataclasses.replace(r, compensate=False) for r in layer]
                              for layer in plan.rules])
    apply(model, plain)
    try:
        without = decode_logits(model, MoaplanCache(plain, 1, 36), ids, mask, tail)
    finally:
        apply(model, plan)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(without, cached))


def test_memory_matches_prediction(model_and_plan):
    model, plan = model_and_plan
    for batch, length, dtype in ((1, 64, torch.float32), (3, 100, torch.float16)):
        cache = MoaplanCache(plan, batch, length, dtype=dtype)
        assert cache.nbytes() == kv_bytes(plan, model.config, length, batch, dtype=dtype)
    dense = kv_bytes(plan, model.config, 4096, 1, dense=True)
    assert kv_bytes(plan, model.config, 4096, 1) < 0.5 * dense


def test_short_requests_hold_no_more_than_a_dense_cache():
    # sink + span(13) = 6 + 20 > 13: the ring is capped at the tokens left after the sinks.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    wide = Rule(sink=6, alpha=20.0, compensate=True)
    plan = Plan(ModelShape.from_config(model.config), [[wide, Rule.full_attention()]] * LAYERS)
    apply(model, plan)
    ids, new = prompt(7, 5), 8
    cache = MoaplanCache(plan, 1, 5 + new)
    assert all(layer.layout.capacity == KV_HEADS * 13 for layer in cache.layers)
    assert cache.nbytes() == kv_bytes(plan, model.config, 13, 1)
    assert torch.equal(generate(model, ids, new, cache), generate(model, ids, new, DynamicCache()))


def test_overflow_and_misuse_are_clear_errors(model_and_plan):
    model, plan = model_and_plan
    cache = MoaplanCache(plan, 1, 12)
    with pytest.raises(ModelError, match="sized for 12 tokens"), torch.no_grad():
        model(prompt(40, 13), **{cache_keyword(model): cache})  # generate would grow it
    # A model that does not run the plan's attention never reads the cache: caught on the
    # next update instead of silently attending to the new token alone.
    plain = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with pytest.raises(ModelError, match="moaplan.apply"):
        generate(plain, prompt(41, 5), 2, MoaplanCache(plan, 1, 16))


def test_append_stores_what_a_prefill_stores(model_and_plan):
    """Keys loaded with ``append`` leave the cache exactly as the model's own prefill does."""
    model, plan = model_and_plan
    ids = prompt(50, 40)
    dense, by_model, loaded = DynamicCache(), MoaplanCache(plan, 1, 48), MoaplanCache(plan, 1, 48)
    with torch.no_grad():
        model(ids, **{cache_keyword(model): dense})
        model(ids, **{cache_keyword(model): by_model})
    for layer in range(LAYERS):
        loaded.layers[layer].append(dense.layers[layer].keys, dense.layers[layer].values)
        torch.testing.assert_close(loaded.layers[layer].keys, by_model.layers[layer].keys)
        torch.testing.assert_close(loaded.layers[layer].values, by_model.layers[layer].values)
    assert loaded.get_seq_length() == by_model.get_seq_length() == 40


def test_reference_model_generates_the_same_tokens():
    """The shipped reference model: several prompts and a left-padded batch of them."""
    from moaplan.model import load_model

    model, tokenizer = load_model()
    kv = model.config.num_key_value_heads
    palette = [Rule.full_attention(), Rule(sink=4, alpha=16.0, beta=0.25),
               Rule.window(24, sink=8), Rule(sink=2, alpha=8.0, beta=0.125),
               Rule(sink=4, alpha=12.0, beta=0.125, compensate=True)]
    rules = [[palette[(layer + h) % len(palette)] for h in range(kv)]
             for layer in range(model.config.num_hidden_layers)]
    plan = Plan(ModelShape.from_config(model.config), rules)
    apply(model, plan)
    texts = ["The passkey is 48213. Remember it. The grass is green and the sky is blue. " * 3
             + "What is the passkey? The passkey is",
             "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
    new = 12
    alone = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        dense = generate(model, ids, new, DynamicCache())
        compressed = generate(model, ids, new, MoaplanCache(plan, 1, ids.shape[1] + new))
        assert torch.equal(compressed, dense)
        alone.append(dense[0, ids.shape[1]:])
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    width = batch["input_ids"].shape[1]
    out = generate(model, batch["input_ids"], new,
                   MoaplanCache(plan, len(texts), width + new), batch["attention_mask"])
    for b in range(len(texts)):
        assert torch.equal(out[b, width:], alone[b])



@pytest.mark.parametrize("first,second", [(1, 2), (3, 0), (9, 5), (40, 7), (100, 30)])
def test_chunk_writes_store_each_slots_token(first, second):
    """Two chunks written one after the other (the first left-padded in one sequence, the
    second right-padded in the other) leave every slot holding the real token its sink or
    ring keeps (sinks filled or not, rings partly filled or wrapped several times), and the
    empty slots zero."""
    config = LlamaConfig(**CONFIG)
    plan = mixed_plan(config, compensate=False)
    gen = torch.Generator().manual_seed(first)
    cache = MoaplanCache(plan, 2, 160)
    chunks = []
    for length, padded in ((first, 0), (second, 1)):
        real = torch.ones(2, length, dtype=torch.bool)
        pads = min(3, length - 1) if length else 0
        if padded == 0:
            real[1, :pads] = False
        else:
            real[0, length - pads:] = False
        chunks.append((real, *(torch.randn(2, KV_HEADS, length, 16, generator=gen)
                               for _ in range(2))))
    for layer in cache.layers:
        for real, key, value in chunks:
            layer.update(key, value)
            layer.take_staged()
            layer.write_chunk(key, value, *layer.positions(real, 2, real.shape[1]))
    for layer in cache.layers:
        for b in range(2):
            held = {name: torch.cat([x[b][:, r[b]] for r, *kv in chunks
                                     for x in [kv[i]]], 1)
                    for i, name in enumerate(("keys", "values"))}  # [Hkv, n, D]
            n = held["keys"].shape[1]
            assert int(layer.n_real[b]) == n
            for h in range(KV_HEADS):
                start, cap = layer.layout.head_slots(h)
                positions = slot_positions(layer.sinks[h], layer.rings[h], torch.tensor([n]))[0]
                for name, tokens in held.items():
                    expected = torch.zeros(cap, 16)
                    expected[positions >= 0] = tokens[h, positions[positions >= 0]]
                    assert torch.equal(getattr(layer, name)[b, start:start + cap], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compensate", [False, True])
def test_first_prefill_layer_never_waits_for_the_stream(compensate):
    # Two host syncs per layer (a check of the chunk's positions, the kept tokens' nonzero)
    # left the GPU idle while the host queued the next layer: ~70 ms of an 8B model's 1.3 s
    # time to first token at 32K on the H200.  With compensation tokens, reading each
    # compensating head's slots from the device layout was one more per head.
    from moaplan.runtime.cached import attend

    config = LlamaConfig(**CONFIG | dict(hidden_size=128))  # head_dim 32
    plan = mixed_plan(config, compensate=compensate)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 200, 32, generator=gen).cuda()
    k, v = (torch.randn(1, KV_HEADS, 200, 32, generator=gen).cuda() for _ in range(2))

    warm, layer = (MoaplanCache(plan, 1, 256, device="cuda").layers[0] for _ in range(2))
    warm.update(k, v)
    attend(warm, q)  # compile and measure the routing cost model outside the check
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.update(k, v)
        attend(layer, q)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(layer.keys, warm.keys)


class _LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation returns (views by their own
    extent, not their storage's)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def test_a_chunk_write_makes_no_copy_of_the_layer_buffer(monkeypatch):
    # Gathering the chunk for the whole buffer at once (then a torch.where of the same size)
    # made two copies of the layer's keys: 1.9 GiB each at batch 30 / 32K for an 8B model's
    # all-full layer, which did not fit beside the largest cache.  Runs of whole heads within
    # WRITE_BYTES at a time, in place: here one head's slots (two do not fit).
    config = LlamaConfig(**CONFIG | dict(hidden_size=128))  # head_dim 32
    plan = Plan(ModelShape.from_config(config), [[Rule.full_attention()] * KV_HEADS] * LAYERS)
    layer = MoaplanCache(plan, 2, 256).layers[0]  # 256 slots a head
    head_bytes = layer.keys.nbytes // KV_HEADS
    monkeypatch.setattr(cache_module, "WRITE_BYTES", 2 * head_bytes - 1)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, KV_HEADS, 64, 32, generator=gen) for _ in range(2))
    with _LargestTensor() as largest:
        layer.append(k, v)
    assert largest.nbytes <= head_bytes
    for buf, chunk in ((layer.keys, k), (layer.values, v)):
        assert torch.equal(buf.view(2, KV_HEADS, 256, 32)[:, :, :64], chunk)
