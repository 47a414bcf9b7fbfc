"""The block-sparse prefill kernel against the reference attention.

On the CPU the kernel runs under Triton's interpreter.  ``TRITON_INTERPRET`` is read when
``@triton.jit`` decorates a function, Triton's own library functions included, so it must be
set before Triton is imported; other test modules may have imported it already.  This module
therefore runs the kernel in one worker process started with the variable set, and leaves its
own process alone.  The interpreter gets bf16 dot products wrong, so bf16 is checked on a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from interpreter import interpreter_pool

from moaplan.errors import ModelError
from moaplan.kernels.prefill import (
    PrefillConfig,
    _program_table,
    _uniform_pack,
    default_config,
    pack_heads,
    reference_attention,
    shared_rule_heads,
    sparse_attention,
)


def _interpreted_attention(kwargs: dict) -> torch.Tensor:
    """Runs in the worker, whose Triton was imported with TRITON_INTERPRET=1."""
    from moaplan.kernels.prefill import sparse_attention

    return sparse_attention(**kwargs, backend="triton")


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield lambda q, k, v, sink, span, **kw: pool.submit(
            _interpreted_attention, dict(q=q, k=k, v=v, sink=sink, span=span, **kw)).result()


# Small tiles so that short sequences exercise sink, edge, interior and diagonal tiles.
SMALL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _qkv(gen, batch, hq, hkv, nq, nk, dim, dtype, device="cpu"):
    q = torch.randn(batch, hq, nq, dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, hkv, nk, dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, hkv, nk, dim, generator=gen).to(device, dtype)
    return q, k, v


def _random_rule(gen, hkv, nk):
    """Per-KV-head sinks and spans that mix sink-only, narrow, wide and full heads."""
    sink = torch.randint(0, 24, (hkv,), generator=gen)
    span = torch.randint(1, nk + 1, (hkv,), generator=gen)
    span[0] = 2**40  # one full head, written the way plans write it
    if hkv > 1:
        span[1] = 1  # only itself plus sinks: most tiles mask most rows
    return sink, span


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    "seed,dtype,dim,group,tma",
    [(0, torch.float32, 32, 1, True), (1, torch.float16, 64, 2, True),
     (2, torch.float32, 32, 4, False), (3, torch.float16, 32, 3, False)],
)
def test_matches_reference(interp, seed, dtype, dim, group, tma):
    gen = torch.Generator().manual_seed(seed)
    hkv, n = 2, 77
    q, k, v = _qkv(gen, 1, hkv * group, hkv, n, n, dim, dtype)
    sink, span = _random_rule(gen, hkv, n)
    ref = reference_attention(q, k, v, sink, span)
    config = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, tma=tma)
    _check(interp(q, k, v, sink, span, config=config), ref, dtype)


def test_layouts_tma_cannot_address_take_pointer_loads(interp):
    """Keys whose head_dim is strided (every other element) or whose base is off the 16-byte
    grid cannot go through a tensor descriptor; the kernel falls back to pointer loads."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = _qkv(gen, 1, 4, 2, 40, 41, 32, torch.float32)
    wide = torch.randn(1, 2, 41, 64, generator=gen)
    strided_k = wide[..., ::2]  # stride(-1) == 2
    shifted_v = torch.randn(1 * 2 * 41 * 32 + 1, generator=gen)[1:].view(1, 2, 41, 32)
    sink, span = torch.tensor([2, 0]), torch.tensor([7, 2**40])
    ref = reference_attention(q, strided_k, shifted_v, sink, span, q_offset=1)
    _check(interp(q, strided_k, shifted_v, sink, span, q_offset=1, config=SMALL), ref,
           torch.float32)


@st.composite
def _cases(draw):
    """Random shapes, plans, GQA ratios, offsets, padding and tile sizes."""
    batch, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    nq = draw(st.integers(1, 60))
    nk = nq + draw(st.integers(0, 40))
    offsets = [draw(st.integers(0, nk - nq)) for _ in range(batch)]
    lens = [draw(st.integers(0, nk)) for _ in range(batch)]
    sink = [draw(st.integers(0, 40)) for _ in range(hkv)]
    # One span per KV head, or one per query head (a plan's query windows), from a few
    # values, so that some query heads of a group share one (and pack) and others do not.
    per_query = group > 1 and draw(st.booleans())
    values = [draw(st.sampled_from([0, 1, 2, 15, 16, 17, 33, nk, 2**40]) | st.integers(0, nk))
              for _ in range(3)]
    span = [draw(st.sampled_from(values)) for _ in range(hkv * group if per_query else hkv)]
    # Compensation tokens on some heads (None: the plain kernel); they need one span a group.
    compensate = None if per_query else draw(
        st.none() | st.lists(st.booleans(), min_size=hkv, max_size=hkv))
    return dict(
        shape=(batch, hkv * group, hkv, nq, nk),
        sink=torch.tensor(sink), span=torch.tensor(span),
        q_offset=torch.tensor(offsets) if draw(st.booleans()) else offsets[0],
        seq_lens=torch.tensor(lens) if draw(st.booleans()) else None,
        compensate=compensate and torch.tensor(compensate),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        block=(draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))),
        # Masked tiles of half the key tile's width where it has room for them.
        half_edges=draw(st.booleans()),
        head_major=draw(st.booleans()),
        tma=draw(st.booleans()),
        # Query heads per program at most (those of a group that share a rule).
        pack=draw(st.sampled_from([1, 2, 4])),
        seed=draw(st.integers(0, 2**31)),
    )


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_random_plans_match_reference(interp, case):
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = _qkv(gen, *case["shape"], 32, case["dtype"])
    kwargs = dict(q_offset=case["q_offset"], seq_lens=case["seq_lens"],
                  compensate=case["compensate"])
    ref = reference_attention(q, k, v, case["sink"], case["span"], **kwargs)
    block_n = case["block"][1]
    config = PrefillConfig(*case["block"], num_warps=4, num_stages=1,
                           head_major=case["head_major"], tma=case["tma"], pack=case["pack"],
                           edge_n=block_n // 2 if case["half_edges"] and block_n > 16 else 0)
    out = interp(q, k, v, case["sink"], case["span"], config=config, **kwargs)
    _check(out, ref, case["dtype"])


@pytest.mark.parametrize("dtype,group,pack", [(torch.float32, 2, 1), (torch.float16, 4, 1),
                                              (torch.float16, 4, 4)])
def test_compensation_mixed_with_plain_heads(interp, dtype, group, pack):
    """Compensating heads (with and without sinks, narrow and wide) beside plain and full ones,
    GQA, per-sequence offsets and right padding; also with a group's query heads packed in
    one program, whose rows then take their queries' mean keys."""
    gen = torch.Generator().manual_seed(20 + group)
    hkv, nq, nk = 4, 45, 90
    q, k, v = _qkv(gen, 2, hkv * group, hkv, nq, nk, 32, dtype)
    sink, span = torch.tensor([5, 0, 3, 0]), torch.tensor([9, 17, 30, 2**40])
    compensate = torch.tensor([True, True, False, True])  # the full head ignores it
    kwargs = dict(q_offset=torch.tensor([nk - nq, 10]), seq_lens=torch.tensor([nk, 40]),
                  compensate=compensate)
    ref = reference_attention(q, k, v, sink, span, **kwargs)
    out = interp(q, k, v, sink, span, config=dataclasses.replace(SMALL, pack=pack), **kwargs)
    _check(out, ref, dtype)
    plain = reference_attention(q, k, v, sink, span, q_offset=kwargs["q_offset"],
                                seq_lens=kwargs["seq_lens"])
    assert (out.float() - plain.float()).abs().max() > 0.1  # the token really changes rows
    assert (out[1, :, 30:] == 0).all()  # padding rows stay zero


def test_per_query_head_rules_and_skipped_heads(interp):
    """Spans (and sinks) per query head, as query windows and the split route give them: a
    head with no sink and no window is skipped (zero rows); every other head follows its own
    rule on its KV head's keys."""
    gen = torch.Generator().manual_seed(40)
    hkv, group, n = 2, 4, 150
    q, k, v = _qkv(gen, 2, hkv * group, hkv, n, n, 32, torch.float16)
    sink = torch.tensor([0, 8, 8, 8, 0, 4, 0, 4])
    span = torch.tensor([0, 2**40, 60, 17, 0, 150, 33, 1])
    ref = reference_attention(q, k, v, sink, span)
    for pack in (1, 4):  # one head per program, and a group's four heads in one program
        out = interp(q, k, v, sink, span, config=dataclasses.replace(SMALL, pack=pack))
        _check(out, ref, torch.float16)
        assert (out[:, [0, 4]] == 0).all()
    # Per-KV-head sinks with per-query-head spans, long tiles, padding.
    kv_sink, seq_lens = torch.tensor([8, 4]), torch.tensor([n, 97])
    ref = reference_attention(q, k, v, kv_sink, span, seq_lens=seq_lens)
    config = PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, head_major=True)
    _check(interp(q, k, v, kv_sink, span, seq_lens=seq_lens, config=config), ref,
           torch.float16)
    with pytest.raises(ModelError, match="compensates but its query heads"):
        interp(q, k, v, kv_sink, span, compensate=[True, False])


def test_compensation_on_a_long_chunk_far_into_the_sequence(interp):
    """Several row blocks of the dropped-key passes (carried sums), chunks starting past the
    span (keys every row drops, summed before the first block), default tiles."""
    gen = torch.Generator().manual_seed(30)
    hkv, group, nq, nk = 2, 2, 300, 700
    q, k, v = _qkv(gen, 2, hkv * group, hkv, nq, nk, 32, torch.float32)
    sink, span = torch.tensor([4, 0]), torch.tensor([50, 130])
    kwargs = dict(q_offset=torch.tensor([400, 150]), seq_lens=torch.tensor([nk, 420]),
                  compensate=torch.tensor([True, True]))
    ref = reference_attention(q, k, v, sink, span, **kwargs)
    _check(interp(q, k, v, sink, span, **kwargs), ref, torch.float32)


def test_offsets_padding_and_strided_views(interp):
    gen = torch.Generator().manual_seed(10)
    batch, hq, hkv, nq, nk, dim = 3, 4, 2, 21, 70, 32
    # transformers' layout [B, N, H, D] seen through a transpose: strided, non-contiguous.
    q = torch.randn(batch, nq, hq, dim, generator=gen).transpose(1, 2)
    k = torch.randn(batch, nk, hkv, dim, generator=gen).transpose(1, 2)
    v = torch.randn(batch, nk, hkv, dim, generator=gen).transpose(1, 2)
    sink = torch.tensor([4, 0])
    span = torch.tensor([9, 40])
    q_offset = torch.tensor([nk - nq, 30, 0])  # a chunk at the end, in the middle, at the start
    seq_lens = torch.tensor([nk, 45, 12])  # sequence 2 ends inside its chunk: padded rows
    kwargs = dict(scale=0.3, q_offset=q_offset, seq_lens=seq_lens)
    ref = reference_attention(q, k, v, sink, span, **kwargs)
    out = interp(q, k, v, sink, span, config=SMALL, **kwargs)
    _check(out, ref, torch.float32)
    assert (out[2, :, 12:] == 0).all()
    # The output keeps q's layout, so the layer's transpose back to [B, N, H, D] is free.
    assert out.stride() == q.stride() and out.transpose(1, 2).is_contiguous()


def test_int_offset_and_default_tiles(interp):
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(gen, 2, 2, 1, 50, 180, 128, torch.float16)
    sink, span = [3], [70]
    ref = reference_attention(q, k, v, torch.tensor(sink), torch.tensor(span), q_offset=130)
    _check(interp(q, k, v, sink, span, q_offset=130), ref, torch.float16)


@pytest.mark.parametrize("head_major", [False, True])
def test_packed_programs_of_a_wide_group(interp, head_major):
    # Groups of 8 query heads packed 4 to a program: two programs a group, batch 2 with
    # per-sequence offsets and padding, per-KV-head rules (sink-only, narrow, full).
    gen = torch.Generator().manual_seed(50)
    hkv, group, nq, nk = 3, 8, 37, 80
    q, k, v = _qkv(gen, 2, hkv * group, hkv, nq, nk, 32, torch.float32)
    sink, span = torch.tensor([6, 3, 0]), torch.tensor([0, 11, 2**40])
    kwargs = dict(q_offset=torch.tensor([nk - nq, 5]), seq_lens=torch.tensor([nk, 30]))
    ref = reference_attention(q, k, v, sink, span, **kwargs)
    config = PrefillConfig(32, 16, 4, 1, head_major=head_major, pack=4)
    _check(interp(q, k, v, sink, span, config=config, **kwargs), ref, torch.float32)


def test_default_tiles():
    # Long programs pack up to 4 query heads of a group; short ones take the long programs'
    # tiles from a reach of 2048 keys where whole groups of 4 (or 8) share a rule, else
    # unpacked 64 x 64 tiles.  Masked tiles in the 128 x 128 programs are 64 keys wide.
    assert default_config(128, 8192, shared=4).pack == 4
    assert default_config(128, 8192).pack == 4
    assert default_config(128, 2048, shared=4).pack == 1
    assert default_config(128, 4096, shared=4) == default_config(128, 8192, shared=4)
    assert default_config(128, 2049, shared=8).pack == 4
    assert default_config(128, 2048, shared=4).block_m == 64
    assert default_config(128, 8192, shared=4).masked_n == 64
    assert default_config(128, 2048).masked_n == 64 == default_config(128, 2048).block_n
    assert default_config(128, 4096, shared=2).block_m == 64
    assert default_config(128, 4096).block_m == 64
    assert shared_rule_heads([64] * 8, [512] * 4 + [2**40] * 4, 4, 1000) == 4
    assert shared_rule_heads([64] * 8, [512] * 3 + [256] + [2**40] * 4, 4, 1000) == 1
    assert shared_rule_heads([0, 64], [8, 8], 1, 1000) == 1
    # Spans (and sinks) past the keys all mean "every key": a group still shares its rule.
    assert shared_rule_heads([0] * 4, [1000, 1001, 2**40, 5000], 4, 1000) == 4


def test_packs_hold_query_heads_of_one_rule():
    # Per group of 4: heads sharing a rule pack in powers of two up to the config's pack;
    # a group of 6 with one rule packs 4 + 2; tiles of 2 rows hold at most 2 heads.
    long = default_config(128, 8192)
    sinks = [0] * 8 + [4] * 6
    spans = [9, 9, 9, 9] + [5, 7, 5, 5] + [3] * 6
    assert pack_heads(sinks[:8], spans[:8], 4, long) == [[0, 1, 2, 3], [4, 6], [7], [5]]
    assert pack_heads(sinks[8:], spans[8:], 6, long) == [[0, 1, 2, 3], [4, 5]]
    assert pack_heads(sinks[:4], spans[:4], 4, dataclasses.replace(long, block_m=2)) == [
        [0, 1], [2, 3]]
    assert pack_heads(sinks[:4], spans[:4], 4, default_config(128, 1024)) == [[0], [1], [2], [3]]
    # The kernel's table: members by pack; per program its pack's first member, log2 of its
    # size and its block (the later first).
    members, programs = _program_table([[0, 1, 2, 3], [4, 6], [7], [5]], 4)
    assert members == [0, 1, 2, 3, 0, 2, 3, 1]
    assert programs == [0 | 2 << 8 | 3 << 16, 2 << 8 | 2 << 16, 2 << 8 | 1 << 16, 2 << 8,
                        0 | 1 << 8 | 1 << 16, 1 << 8, 2, 3]
    # Packs of one size, of consecutive heads each, need no table; any other launch does.
    assert _uniform_pack([[0, 1, 2, 3], [4, 5, 6, 7]]) == 4
    assert _uniform_pack([[0], [1], [2]]) == 1
    assert _uniform_pack([[0, 1, 2, 3], [4, 6], [7], [5]]) == 0
    assert _uniform_pack([[0, 2], [1, 3]]) == 0


@pytest.mark.parametrize("head_major", [False, True])
def test_packs_of_heads_that_share_a_rule_in_a_group_of_their_own_spans(interp, head_major):
    """Per-query-head spans where some heads of a group share a rule: they pack (a group of
    4 alike, 2 of 3 alike, 2 alike), the others run alone, beside a skipped head (no sink,
    no window)."""
    gen = torch.Generator().manual_seed(60)
    hkv, group, nq, nk = 3, 4, 45, 70
    q, k, v = _qkv(gen, 2, hkv * group, hkv, nq, nk, 32, torch.float16)
    sink = torch.tensor([3, 3, 3])
    span = torch.tensor([17, 17, 17, 17] + [9, 2**40, 9, 9] + [0, 33, 33, 5])
    sink_q = sink.repeat_interleave(group)
    sink_q[8] = 0  # with span 0: sees nothing
    # The first group, one rule, also takes the compensation token (its mean keys read by
    # a program that found its heads in the table).
    kwargs = dict(q_offset=torch.tensor([nk - nq, 3]), seq_lens=torch.tensor([nk, 50]),
                  compensate=torch.tensor([True, False, False]))
    ref = reference_attention(q, k, v, sink_q, span, **kwargs)
    config = PrefillConfig(32, 16, 4, 1, head_major=head_major, pack=4)
    out = interp(q, k, v, sink_q, span, config=config, **kwargs)
    _check(out, ref, torch.float16)
    assert (out[:, 8] == 0).all()


@pytest.mark.parametrize("edge_n", [8, 48, 256])
def test_masked_tiles_must_divide_the_key_tile(edge_n):
    with pytest.raises(ValueError, match="power of two >= 16 that divides block_n=128"):
        PrefillConfig(128, 128, 8, 3, edge_n=edge_n)


@pytest.mark.parametrize("head_major,edge_n", [(False, 0), (True, 64)])
def test_h100_tile_shapes(interp, head_major, edge_n):
    # The 128 x 128 tiles long plans use on the GPU (in head-major order, with 64-key masked
    # tiles), on a batch with padding and a length that ends mid-tile.
    gen = torch.Generator().manual_seed(13)
    q, k, v = _qkv(gen, 2, 4, 2, 300, 300, 32, torch.float16)
    sink, span = _random_rule(gen, 2, 300)
    seq_lens = torch.tensor([300, 170])
    ref = reference_attention(q, k, v, sink, span, seq_lens=seq_lens)
    config = PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3,
                           head_major=head_major, edge_n=edge_n)
    _check(interp(q, k, v, sink, span, seq_lens=seq_lens, config=config), ref, torch.float16)


def test_rows_without_visible_keys_are_zero_not_nan(interp):
    # span 0 and no sink: every row sees nothing; queries past the keys see nothing either.
    gen = torch.Generator().manual_seed(12)
    q, k, v = _qkv(gen, 1, 2, 2, 40, 40, 32, torch.float32)
    out = interp(q, k, v, [0, 5], [0, 3], q_offset=20, config=SMALL)
    ref = reference_attention(q, k, v, torch.tensor([0, 5]), torch.tensor([0, 3]), q_offset=20)
    _check(out, ref, torch.float32)
    assert (out[:, 0] == 0).all() and (out[:, :, 20:] == 0).all()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "k": a["k"].half()}, "share one dtype"),
        (lambda a: {**a, "q": a["q"][..., :16], "k": a["k"][..., :16], "v": a["v"][..., :16]},
         "head_dim 16"),
        (lambda a: {**a, "q": a["q"][:, :3]}, "not a multiple"),
        (lambda a: {**a, "span": [4]}, "span has 1 entries"),
        (lambda a: {**a, "sink": [-1, 0]}, ">= 0"),
        (lambda a: {**a, "q": a["q"][0]}, "4-D"),
        (lambda a: {**a, "v": a["v"][:, :, :5]}, "shapes differ"),
        (lambda a: {**a, "seq_lens": torch.tensor([3, 4])}, "seq_lens"),
    ],
)
def test_bad_input_is_a_one_line_error(interp, change, message):
    q = torch.randn(1, 4, 8, 32)
    k = v = torch.randn(1, 2, 8, 32)
    args = change(dict(q=q, k=k, v=v, sink=[0, 0], span=[4, 4]))
    with pytest.raises(ModelError, match=message) as err:
        interp(**args)
    assert "\n" not in str(err.value)


def test_compiled_kernel_refuses_cpu_tensors():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    x = torch.randn(1, 1, 8, 32)
    with pytest.raises(ModelError, match="CUDA"):
        sparse_attention(x, x, x, [0], [4], backend="triton")
    # the default picks the torch version on the CPU
    assert torch.equal(sparse_attention(x, x, x, [0], [4]), reference_attention(x, x, x, [0], [4]))


# The long programs' tiles with a group's 4 query heads packed and 64-key masked tiles (the
# default only from 2048 keys of reach on).
LONG_PACKED = PrefillConfig(128, 128, 8, 3, head_major=True, pack=4, edge_n=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dim,group,config", [(64, 4, None), (128, 1, None), (128, 4, None),
                                              (128, 4, LONG_PACKED)])
def test_bf16_on_gpu_within_sdpa_error(dim, group, config):
    gen = torch.Generator().manual_seed(dim + group)
    hkv, n = 4, 1500
    q, k, v = _qkv(gen, 2, hkv * group, hkv, n, n, dim, torch.bfloat16, "cuda")
    sink, span = _random_rule(gen, hkv, n)
    seq_lens = torch.tensor([n, 1100])
    compensate = torch.tensor([True, True, False, True])  # heads 1 and 3 compensate
    out = sparse_attention(q, k, v, sink, span, seq_lens=seq_lens, compensate=compensate,
                           config=config)
    ref = reference_attention(q.float(), k.float(), v.float(), sink, span, seq_lens=seq_lens,
                              compensate=compensate)
    assert not out.isnan().any()
    assert (out.float() - ref).abs().max().item() <= 1.5 * _sdpa_error(q, k, v)


def _sdpa_error(q, k, v) -> float:
    """Dense causal SDPA in bf16 against its own fp32 result: the error a bf16 kernel is
    allowed (times a margin)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    sdpa_ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), kk.float(), vv.float(), is_causal=True)
    return (sdpa.float() - sdpa_ref).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_packs_from_the_program_table_on_gpu_within_sdpa_error():
    """Per-query-head spans, some shared in a group (packs of 4, of 2 and single heads, read
    from the program table), on the long programs' tiles, beside a skipped head."""
    gen = torch.Generator().manual_seed(7)
    n = 1500
    q, k, v = _qkv(gen, 1, 12, 3, n, n, 128, torch.bfloat16, "cuda")
    sink = torch.full((12,), 64)
    sink[8] = 0
    span = torch.tensor([700] * 4 + [300, 2**40, 300, 300] + [0, 900, 900, 128])
    out = sparse_attention(q, k, v, sink, span, config=LONG_PACKED)
    ref = reference_attention(q.float(), k.float(), v.float(), sink, span)
    assert not out.isnan().any() and (out[:, 8] == 0).all()
    assert (out.float() - ref).abs().max().item() <= 1.5 * _sdpa_error(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_call_never_waits_for_the_stream():
    # A host sync per call left the GPU idle while the launch was prepared (~60 us a layer).
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, 2, 8, 2, 300, 300, 64, torch.float16, "cuda")
    q = q[:, :, 100:]  # a chunk of 200 queries after 100 keys of context
    args = dict(seq_lens=torch.tensor([300, 250]), q_offset=torch.tensor([100, 100]),
                compensate=[True, False])
    sparse_attention(q, k, v, [4, 0], [64, 300], **args)  # compile outside the check
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sparse_attention(q, k, v, [4, 0], [64, 300], **args)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
