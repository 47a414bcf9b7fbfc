"""The split-KV decode kernel (and its torch path) against the reference attention.

The Triton kernel runs on the CPU under Triton's interpreter, in one worker process started
with ``TRITON_INTERPRET=1`` (the variable is read when Triton is imported, which other test
modules may already have done in this process).  The interpreter gets bf16 dot products
wrong, so bf16 is checked on a GPU only.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import interpreter_pool

from moaplan.errors import ModelError
from moaplan.kernels.decode import decode_attention, decode_layout, slot_positions
from moaplan.runtime.reference import reference_attention

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _interpreted(args: tuple, kwargs: dict) -> torch.Tensor:
    """Runs in the worker, whose Triton was imported with TRITON_INTERPRET=1."""
    from moaplan.kernels.decode import decode_attention

    return decode_attention(*args, **kwargs, backend="triton")


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield lambda *args, **kw: pool.submit(_interpreted, args, kw).result()


def make_case(seed, sinks, rings, n, hq, dim, dtype, device="cpu", chunk=64):
    """Dense keys of every sequence, the compressed buffers holding what the cache would,
    the query of the newest token, and per-sequence spans no wider than the rings."""
    gen = torch.Generator().manual_seed(seed)
    batch, hkv, longest = len(n), len(sinks), max(n)
    n = torch.tensor(n)
    layout = decode_layout(sinks, rings, device=device, chunk=chunk)
    k = torch.randn(batch, hkv, max(longest, 1), dim, generator=gen)
    v = torch.randn(batch, hkv, max(longest, 1), dim, generator=gen)
    k_buf = torch.zeros(batch, layout.capacity, dim)
    v_buf = torch.zeros(batch, layout.capacity, dim)
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
                n_seen=n.to(device), span=span.to(device), k=k.to(**to), v=v.to(**to))


def reference(case) -> torch.Tensor:
    outs = []
    for b, n in enumerate(case["n_seen"].tolist()):
        if n == 0:
            outs.append(torch.zeros_like(case["q"][b]))
            continue
        out = reference_attention(case["q"][b:b + 1, :, None], case["k"][b:b + 1, :, :n],
                                  case["v"][b:b + 1, :, :n], case["layout"].sinks,
                                  case["span"][b], q_offset=n - 1)
        outs.append(out[0, :, 0])
    return torch.stack(outs)


def run(case, kernel):
    args = tuple(case[name] for name in ("q", "k_buf", "v_buf", "layout", "n_seen", "span"))
    return kernel(*args)


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
    out = run(case, lambda *a: decode_attention(*a, backend="torch"))
    assert rel_err(out, reference(case)) < TOL[torch.float32]


def test_many_items_per_head(interp):
    """Tiny chunks: a head split into more partials than the merge takes in one step."""
    case = make_case(5, [3, 0], [600, 40], [700, 20], 4, 32, torch.float32, chunk=16)
    assert int(case["layout"].item_count.max()) > 32
    assert rel_err(run(case, interp), reference(case)) < TOL[torch.float32]


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype):
    sinks, rings = [64, 64, 0, 64, 64, 0, 64, 64], [96, 512, 3000, 1024, 2048, 700, 128, 4000]
    case = make_case(11, sinks, rings, [5, 700, 2500, 4064], 32, 128, dtype, device="cuda",
                     chunk=None)
    out = run(case, lambda *a: decode_attention(*a, backend="triton"))
    assert rel_err(out, reference(case)) < TOL[dtype]
