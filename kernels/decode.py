"""Split-KV decode attention over the compressed cache (flash-decoding), Triton and torch.

Storage convention (shared with :mod:`moaplan.runtime.cache`): one layer keeps its keys in
one flat buffer ``[B, C, D]`` (values alike).  KV head ``h`` owns slots
``[offset[h], offset[h] + sink[h] + ring[h])``: the first ``sink[h]`` slots hold the tokens at
positions ``0 .. sink-1``, and a ring of ``ring[h]`` slots holds the latest tokens after them,
token ``p >= sink`` in ring slot ``(p - sink) % ring``.  Keys are stored after RoPE, so the
order inside the ring does not matter to attention; only which slots are visible does.

With ``n`` real tokens written (the query itself included) the query sits at ``i = n - 1``
and sees sink slot ``s`` iff ``s < n``, and ring slot ``r`` iff it is filled and its token is
less than ``span`` tokens old: ``(newest - r) mod ring < span``, ``newest = (n-1-sink) % ring``.
``span`` may be smaller than ``ring``: the ring is sized for the longest length of the
request, the rule's span grows with the current length.

Kernel: the work list is static per layer, ``(KV head, first slot)`` items of ``chunk`` slots
covering every head's capacity; the grid is ``(item, sequence)``.  Long heads get many items,
short heads few, so the launch stays balanced however different the heads are.  One program
loads each K/V tile once for all query heads of its GQA group (packed into one ``tl.dot``
tile), and writes a partial output with its log-sum-exp; a second small kernel merges the
partials of each (sequence, KV head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moaplan.errors import ModelError

_LOG2E = 1.4426950408889634
# Slots per work item: the fastest in the H100 sweep at batch 8 / 32K and batch 1 / 128K
# (benchmarks/results/h100/decode.md); smaller chunks lose to the serial merge of long heads.
DEFAULT_CHUNK = 2048


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel: key tile rows, warps, pipeline stages."""

    # The fastest launch in the H100 sweep at both measured shapes.
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 4


@dataclass(frozen=True)
class DecodeLayout:
    """The static shape of one layer's compressed cache, and its split-KV work list."""

    offsets: torch.Tensor  # int32 [Hkv]: first slot of each head
    sinks: torch.Tensor  # int32 [Hkv]
    rings: torch.Tensor  # int32 [Hkv]
    items: torch.Tensor  # int32 [n_items, 2]: (KV head, first slot within the head)
    first_item: torch.Tensor  # int32 [Hkv]: the items of head h are first_item[h] + 0..count-1
    item_count: torch.Tensor  # int32 [Hkv]
    chunk: int
    capacity: int  # slots per sequence: sum of sink + ring

    @property
    def num_kv_heads(self) -> int:
        return self.offsets.numel()

    def head_slots(self, head: int) -> tuple[int, int]:
        """``(first slot, number of slots)`` of one KV head (host ints)."""
        return int(self.offsets[head]), int(self.sinks[head]) + int(self.rings[head])


def decode_layout(sinks: Sequence[int], rings: Sequence[int], *,
                  device: torch.device | str = "cpu", chunk: int | None = None) -> DecodeLayout:
    """Slot offsets and the work list for heads with ``sinks[h]`` sink slots and a ring of
    ``rings[h]`` slots, split into work items of ``chunk`` slots (default
    ``DEFAULT_CHUNK``)."""
    sinks, rings = [int(s) for s in sinks], [int(r) for r in rings]
    if len(sinks) != len(rings) or not sinks:
        raise ModelError(f"need one sink and one ring size per KV head, got {len(sinks)} and "
                         f"{len(rings)}")
    if min(sinks) < 0 or min(rings) < 1:
        raise ModelError(f"sinks must be >= 0 and rings >= 1, got {sinks} and {rings}")
    caps = [s + r for s, r in zip(sinks, rings)]
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk < 1:
        raise ModelError(f"chunk must be >= 1, got {chunk}")
    items, first, count = [], [], []
    for h, cap in enumerate(caps):
        first.append(len(items))
        items.extend((h, start) for start in range(0, cap, chunk))
        count.append(len(items) - first[-1])
    offsets = [0]
    for cap in caps[:-1]:
        offsets.append(offsets[-1] + cap)

    def ints(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return DecodeLayout(ints(offsets), ints(sinks), ints(rings), ints(items).reshape(-1, 2),
                        ints(first), ints(count), chunk, sum(caps))


def slot_positions(sink: int, ring: int, n: torch.Tensor) -> torch.Tensor:
    """Token position held by each slot of one head after ``n[b]`` real tokens: int64
    ``[B, sink + ring]``, ``-1`` for an empty slot."""
    n = n.to(torch.int64)[:, None]
    slot = torch.arange(sink + ring, device=n.device)
    r = (slot - sink).clamp(min=0)
    newest = (n - 1 - sink).clamp(min=0) % ring
    age = (newest - r) % ring  # torch's % of ints is never negative
    pos = torch.where(slot < sink, slot, n - 1 - age)
    filled = torch.where(slot < sink, slot < n, r < (n - sink).clamp(0, ring))
    return torch.where(filled, pos, -1)


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr,
    offsets_ptr, sinks_ptr, rings_ptr, items_ptr, n_seen_ptr, span_ptr,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kd,
    stride_vb, stride_vt, stride_vd, n_items, n_kv_heads, chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.load(items_ptr + 2 * item)
    start = tl.load(items_ptr + 2 * item + 1)
    base = tl.load(offsets_ptr + head)
    sink = tl.load(sinks_ptr + head)
    ring = tl.load(rings_ptr + head)
    n = tl.load(n_seen_ptr + b)
    span = tl.load(span_ptr + b * n_kv_heads + head)
    end = tl.minimum(start + chunk, sink + ring)
    n_ring = tl.minimum(tl.maximum(n - sink, 0), ring)
    newest = tl.maximum(n - 1 - sink, 0) % ring

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = head * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=(offs_g < GROUP)[:, None], other=0.0)
    k_base = k_ptr + b.to(tl.int64) * stride_kb
    v_base = v_ptr + b.to(tl.int64) * stride_vb

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_N):
        slot = s0 + offs_n
        r = slot - sink
        age = (newest - r + ring) % ring
        ok = (slot < end) & tl.where(slot < sink, slot < n, (r < n_ring) & (age < span))
        rows = (base + slot).to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=ok[:, None], other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A tile with no visible key leaves m_new at -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * n_items + item) * BLOCK_G + offs_g
    tl.store(part_lse_ptr + row, lse)
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out)


@triton.jit
def _merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, first_ptr, count_ptr,
    stride_ob, stride_oh, stride_od, n_items,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
):
    head = tl.program_id(0)
    b = tl.program_id(1)
    first = tl.load(first_ptr + head)
    count = tl.load(count_ptr + head)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for item in range(first, first + count):
        row = (b * n_items + item) * BLOCK_G + offs_g
        lse = tl.load(part_lse_ptr + row)
        o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :])
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    q_rows = head * GROUP + offs_g
    tl.store(out_ptr + b * stride_ob + q_rows[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=(offs_g < GROUP)[:, None])


def _check(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layout: DecodeLayout,
           n_seen: torch.Tensor, span: torch.Tensor) -> None:
    batch, n_q_heads, head_dim = q.shape
    n_kv = layout.num_kv_heads
    if k_buf.shape != v_buf.shape or k_buf.shape != (batch, layout.capacity, head_dim):
        raise ModelError(f"k/v buffers {tuple(k_buf.shape)} and {tuple(v_buf.shape)} do not "
                         f"match [B={batch}, C={layout.capacity}, D={head_dim}]")
    if n_q_heads % n_kv:
        raise ModelError(f"{n_q_heads} query heads are not a multiple of {n_kv} KV heads")
    if not (q.dtype == k_buf.dtype == v_buf.dtype):
        raise ModelError(f"q, k, v dtypes differ: {q.dtype}, {k_buf.dtype}, {v_buf.dtype}")
    if n_seen.shape != (batch,) or span.shape != (batch, n_kv):
        raise ModelError(f"n_seen must be [{batch}] and span [{batch}, {n_kv}], got "
                         f"{tuple(n_seen.shape)} and {tuple(span.shape)}")


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    layout: DecodeLayout,
    n_seen: torch.Tensor,
    span: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """One decode step of one layer over its compressed cache.

    ``q``: ``[B, Hq, D]`` (the new token of each sequence, already written to the cache);
    ``k_buf``/``v_buf``: ``[B, C, D]`` laid out by ``layout``; ``n_seen``: int ``[B]`` real
    tokens written per sequence (the query is token ``n_seen - 1``); ``span``: int
    ``[B, Hkv]`` the rule's span at that length.  Returns ``[B, Hq, D]`` in ``q.dtype``; a
    sequence with nothing visible gets zeros.  ``backend``: ``"triton"``, ``"torch"`` or
    ``"auto"`` (Triton on CUDA tensors, torch elsewhere).
    """
    _check(q, k_buf, v_buf, layout, n_seen, span)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "torch":
        return _decode_torch(q, k_buf, v_buf, layout, n_seen, span, scale)
    if backend != "triton":
        raise ModelError(f"unknown decode backend {backend!r}; use 'triton', 'torch' or 'auto'")
    return _decode_triton(q, k_buf, v_buf, layout, n_seen, span, scale, config or DecodeConfig())


def _decode_triton(q, k_buf, v_buf, layout, n_seen, span, scale, cfg) -> torch.Tensor:
    batch, n_q_heads, head_dim = q.shape
    group = n_q_heads // layout.num_kv_heads
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    n_items = layout.items.shape[0]
    part_o = torch.empty((batch, n_items, block_g, head_dim), dtype=torch.float32,
                         device=q.device)
    part_lse = torch.empty((batch, n_items, block_g), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    n_seen = n_seen.to(torch.int32)
    span = span.to(torch.int32).contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kernel[(n_items, batch)](
        q, k_buf, v_buf, part_o, part_lse,
        layout.offsets, layout.sinks, layout.rings, layout.items, n_seen, span,
        *q.stride(), *k_buf.stride(), *v_buf.stride(), n_items, layout.num_kv_heads,
        layout.chunk, scale * _LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_N=cfg.block_n,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _merge_kernel[(layout.num_kv_heads, batch)](
        part_o, part_lse, out, layout.first_item, layout.item_count,
        *out.stride(), n_items, GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, num_warps=4,
    )
    return out


def _decode_torch(q, k_buf, v_buf, layout, n_seen, span, scale) -> torch.Tensor:
    """The same function in plain torch, one KV head at a time (the CPU path)."""
    batch, n_q_heads, head_dim = q.shape
    n_kv = layout.num_kv_heads
    group = n_q_heads // n_kv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_seen = n_seen.to(torch.int64)
    out = torch.empty_like(q)
    for h in range(n_kv):
        first, cap = layout.head_slots(h)
        sink = int(layout.sinks[h])
        pos = slot_positions(sink, cap - sink, n_seen)  # [B, cap]
        query_pos = (n_seen - 1)[:, None]
        ok = (pos >= 0) & ((pos < sink) | (query_pos - pos < span[:, h, None].to(torch.int64)))
        k = k_buf[:, first:first + cap].to(compute)
        v = v_buf[:, first:first + cap].to(compute)
        qh = q[:, h * group:(h + 1) * group].to(compute)
        scores = torch.einsum("bgd,bkd->bgk", qh, k) * scale
        scores = scores.masked_fill(~ok[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, h * group:(h + 1) * group] = torch.einsum("bgk,bkd->bgd", probs, v).to(q.dtype)
    return out
