"""The split-KV decode kernel (and its torch path) against the reference attention.

The Triton kernel runs on the CPU under Triton's interpreter, in one worker process started
with ``TRITON_INTERPRET=1`` (the variable is read when Triton is imported, which other test
modules may already have done in this process).  The interpreter gets bf16 dot products
wrong, so bf16 is checked on a GPU only.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from interpreter import interpreter_pool

from moaplan.errors import ModelError
from moaplan.kernels.decode import _MERGE_BLOCK, decode_attention
from moaplan.kernels.layout import decode_layout, slot_positions, target_items
from moaplan.kernels.prefill import reference_attention

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _interpreted(args: tuple, kwargs: dict) -> torch.Tensor:
    """Runs in the worker, whose Triton was imported with TRITON_INTERPRET=1."""
    from moaplan.kernels.decode import decode_attention

    return decode_attention(*args, **kwargs, backend="triton")


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield lambda *args, **kw: pool.submit(_interpreted, args, kw).result()


def make_case(seed, sinks, rings, n, hq, dim, dtype, device="cpu", chunk=64, compensate=None):
    """Dense keys of every sequence, the compressed buffers holding what the cache would,
    the query of the newest token, per-sequence spans no wider than the rings, and the fp32
    sums of the tokens that left the rings (what the cache keeps for compensating heads)."""
    gen = torch.Generator().manual_seed(seed)
    batch, hkv, longest = len(n), len(sinks), max(n)
    n = torch.tensor(n)
    layout = decode_layout(sinks, rings, batch=batch, device=device, chunk=chunk,
                           compensate=compensate)
    k = torch.randn(batch, hkv, max(longest, 1), dim, generator=gen)
    v = torch.randn(batch, hkv, max(longest, 1), dim, generator=gen)
    k_buf = torch.zeros(batch, layout.capacity, dim)
    v_buf = torch.zeros(batch, layout.capacity, dim)
    evicted = torch.zeros(2, batch, hkv, dim)
    for b, h in itertools.product(range(batch), range(hkv)):
        gone = slice(sinks[h], max(sinks[h], int(n[b]) - rings[h]))
        evicted[0, b, h], evicted[1, b, h] = k[b, h, gone].sum(0), v[b, h, gone].sum(0)
    for h in range(hkv):
        first, cap = layout.head_slots(h)
        pos = slot_positions(sinks[h], rings[h], n)
        held = (pos >= 0)[..., None]
        rows = torch.arange(batch)[:, None]
        k_buf[:, first:first + cap] = torch.where(held, k[rows, h, pos.clamp(min=0)], 0.0)
        v_buf[:, first:first + cap] = torch.where(held, v[rows, h, pos.clamp(min=0)], 0.0)
    # Spans up to the ring (the cache's rings are sized at the request's longest length).
    span = torch.stack([torch.randint(1, r + 1, (batch,), generator=gen) for r in rings], 1)
    q = torch.randn(batch, hq, dim, generator=gen)
    to = dict(device=device, dtype=dtype)
    return dict(q=q.to(**to), k_buf=k_buf.to(**to), v_buf=v_buf.to(**to), layout=layout,
                n_seen=n.to(device), span=span.to(device), k=k.to(**to), v=v.to(**to),
                evicted=tuple(evicted.to(device)), compensate=compensate)


def reference(case) -> torch.Tensor:
    outs = []
    for b, n in enumerate(case["n_seen"].tolist()):
        if n == 0:
            outs.append(torch.zeros_like(case["q"][b]))
            continue
        out = reference_attention(case["q"][b:b + 1, :, None], case["k"][b:b + 1, :, :n],
                                  case["v"][b:b + 1, :, :n], case["layout"].sinks,
                                  case["span"][b], q_offset=n - 1,
                                  compensate=case["compensate"])
        outs.append(out[0, :, 0])
    return torch.stack(outs)


def run(case, kernel):
    args = tuple(case[name] for name in ("q", "k_buf", "v_buf", "layout", "n_seen", "span"))
    return kernel(*args, evicted=case["evicted"])


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-12))


# (sinks, rings, tokens per sequence, query heads): rings that wrapped, that did not, empty
# sinks, a sequence shorter than its sinks, heads far apart in size, GQA groups 1 and 4.
CASES = [
    ([4, 0], [40, 150], [3, 57, 190], 8),
    ([0, 2, 16, 1], [5, 70, 33, 130], [1, 200, 40, 16], 4),
    ([64], [96], [64, 65, 161, 1000], 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case_id", range(len(CASES)))
def test_triton_matches_reference(interp, case_id, dtype):
    sinks, rings, n, hq = CASES[case_id]
    case = make_case(case_id, sinks, rings, n, hq, 32, dtype)
    ref = reference(case)
    assert rel_err(run(case, interp), ref) < TOL[dtype]


@pytest.mark.parametrize("case_id", range(len(CASES)))
def test_torch_path_matches_reference(case_id):
    sinks, rings, n, hq = CASES[case_id]
    case = make_case(case_id, sinks, rings, n, hq, 64, torch.float32)
    out = run(case, lambda *a, **kw: decode_attention(*a, **kw, backend="torch"))
    assert rel_err(out, reference(case)) < TOL[torch.float32]


# Compensating heads mixed with plain ones: wrapped and unwrapped rings, spans below the ring
# (stale ring slots), a sequence inside its sinks, GQA groups 1 and 4, several items per head.
COMP_CASES = [
    ([4, 0, 2], [40, 30, 150], [3, 57, 190], 4, [True, True, False]),
    ([0, 3], [20, 70], [1, 200, 45], 2, [True, True]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case_id", range(len(COMP_CASES)))
def test_compensation_triton_and_torch_match_reference(interp, case_id, dtype):
    sinks, rings, n, group, compensate = COMP_CASES[case_id]
    case = make_case(40 + case_id, sinks, rings, n, group * len(sinks), 32, dtype, chunk=16,
                     compensate=compensate)
    ref = reference(case)
    plain = reference(dict(case, compensate=None))
    assert rel_err(plain, ref) > 10 * TOL[dtype]  # the token changes the output
    assert rel_err(run(case, interp), ref) < TOL[dtype]
    torch_path = run(case, lambda *a, **kw: decode_attention(*a, **kw, backend="torch"))
    assert rel_err(torch_path, ref) < TOL[dtype]


# (GQA group, compensate, dtype): every group with and without the token in fp32, fp16 at 8.
LONG_HEAD_CASES = [(g, c, torch.float32) for g in (1, 4, 8) for c in (None, [True, False, True])]
LONG_HEAD_CASES += [(8, None, torch.float16), (8, [True, False, True], torch.float16)]


@pytest.mark.parametrize(("group", "compensate", "dtype"), LONG_HEAD_CASES)
def test_long_heads_merge_in_several_steps(interp, group, compensate, dtype):
    """Tiny chunks: a head split into more partials than one merge step takes (the last step
    part masked), beside short heads; a sequence that wrapped the long ring and one that did
    not."""
    case = make_case(50 + group, [3, 0, 5], [300, 40, 60], [700, 250], group * 3, 32, dtype,
                     chunk=8, compensate=compensate)
    assert int(case["layout"].item_count.max()) > _MERGE_BLOCK
    assert rel_err(run(case, interp), reference(case)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stale_ring_slots_in_two_ranges(interp, dtype):
    """Chosen spans: a wrapped ring whose stale slots form two ranges sharing one item, over
    more items than one merge step takes (head 0, span 1); one range (head 0, span 100); two
    ranges in separate items (head 1, span 7); a full-span ring with only evicted tokens
    (head 1, span 40); a plain head beside them."""
    case = make_case(60, [3, 0, 5], [300, 40, 60], [700, 250], 6, 32, dtype, chunk=8,
                     compensate=[True, True, False])
    case["span"] = torch.tensor([[1, 7, 20], [100, 40, 60]])
    ref = reference(case)
    assert rel_err(run(case, interp), ref) < TOL[dtype]
    torch_path = run(case, lambda *a, **kw: decode_attention(*a, **kw, backend="torch"))
    assert rel_err(torch_path, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_spans_wider_than_rings_that_hold_every_token(interp, dtype):
    """A short request's rings are capped at the tokens after the sinks (``cache_slots``), so
    a span can exceed its ring; every token is held and the rule still decides."""
    case = make_case(70, [4, 0, 2], [10, 14, 12], [14, 9, 5], 6, 32, dtype, chunk=8,
                     compensate=[True, False, True])
    case["span"] = torch.tensor([[13, 14, 14], [9, 9, 8], [5, 2, 5]])  # up to n > ring
    ref = reference(case)
    assert rel_err(run(case, interp), ref) < TOL[dtype]
    torch_path = run(case, lambda *a, **kw: decode_attention(*a, **kw, backend="torch"))
    assert rel_err(torch_path, ref) < TOL[dtype]


def test_default_chunk_gives_enough_work_items():
    """The bench's mixed plan (spans N/32..N/2 with 64 sinks, 3 full heads) on the CPU (no SM
    count: the items of two per SM of an H200, 264): 2048-slot chunks at batch 1 / 128K and
    4096 at batch 8 / 32K, as the H200 sweep picked, capped chunks at batch 64, and short
    contexts split to about 264 items."""
    def mixed(n: int) -> tuple[list[int], list[int]]:
        return [64] * 5 + [0] * 3, [n // 32, n // 16, n // 8, n // 4, n // 2] + [n] * 3

    for batch, n, chunk, items in ((1, 131072, 2048, 259), (8, 32768, 4096, 36 * 8),
                                   (64, 32768, 4096, 36 * 64), (1, 4096, 64, 259)):
        layout = decode_layout(*mixed(n), batch=batch)
        assert (layout.chunk, batch * layout.items.shape[0]) == (chunk, items)
    assert decode_layout([0], [10], batch=3).chunk == 64
    assert target_items("cpu") == 264
    with pytest.raises(ModelError, match="batch"):
        decode_layout([0], [10], batch=0)


def test_nothing_visible_gives_zeros(interp):
    case = make_case(7, [2, 0], [8, 8], [0, 5], 4, 32, torch.float32)
    out = run(case, interp)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert rel_err(out[1], reference(case)[1]) < TOL[torch.float32]


def test_work_list_covers_every_slot_once():
    sinks, rings = [0, 64, 3], [1000, 100, 7]
    layout = decode_layout(sinks, rings, chunk=128)
    for h, (s, r) in enumerate(zip(sinks, rings)):
        first, count = int(layout.first_item[h]), int(layout.item_count[h])
        starts = layout.items[first:first + count]
        assert (starts[:, 0] == h).all()
        covered = torch.cat([torch.arange(a, min(a + 128, s + r)) for a in starts[:, 1].tolist()])
        assert torch.equal(covered, torch.arange(s + r))
    assert layout.capacity == sum(sinks) + sum(rings)


def test_bad_shapes_are_clear_errors():
    case = make_case(0, [1, 1], [8, 8], [4], 4, 32, torch.float32)
    with pytest.raises(ModelError, match="do not match"):
        decode_attention(case["q"], case["k_buf"][:, :3], case["v_buf"], case["layout"],
                         case["n_seen"], case["span"])
    with pytest.raises(ModelError, match="multiple"):
        decode_attention(case["q"][:, :3], case["k_buf"], case["v_buf"], case["layout"],
                         case["n_seen"], case["span"])
    comp = make_case(0, [1, 1], [8, 8], [4], 4, 32, torch.float32, compensate=[True, False])
    with pytest.raises(ModelError, match="evicted"):
        decode_attention(comp["q"], comp["k_buf"], comp["v_buf"], comp["layout"],
                         comp["n_seen"], comp["span"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype):
    sinks, rings = [64, 64, 0, 64, 64, 0, 64, 64], [96, 512, 3000, 1024, 2048, 700, 128, 4000]
    case = make_case(11, sinks, rings, [5, 700, 2500, 4064], 32, 128, dtype, device="cuda",
                     chunk=None, compensate=[True, False, True, False, True, False, True, True])
    out = run(case, lambda *a, **kw: decode_attention(*a, **kw, backend="triton"))
    assert rel_err(out, reference(case)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layout_aims_at_two_items_per_sm():
    """On a GPU the default chunk follows its SM count: a long single sequence gets about
    two work items per SM (the chunk is the nearest power of two, so within a factor of
    sqrt(2), and each head's last item may be partial)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rings = [16384, 32768, 65536, 131072]
    layout = decode_layout([64] * 4, rings, batch=1, device="cuda")
    assert 2 * sms / 2**0.5 <= layout.items.shape[0] <= 2 * sms * 2**0.5 + len(rings)
