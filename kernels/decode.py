"""Split-KV decode attention over the compressed cache (flash-decoding): the Triton kernel, its
launcher and its torch version behind one ``backend`` switch, and the torch attention of a
multi-token chunk over the cache (which has no kernel).

The cache's slot layout is :mod:`moaplan.kernels.layout`'s.  With ``n`` real tokens written
(the query itself included) the query sits at ``i = n - 1`` and sees sink slot ``s`` iff
``s < n``, and ring slot ``r`` iff it is filled and its token is less than ``span`` tokens old:
``(newest - r) mod ring < span``, ``newest = (n-1-sink) % ring``.  ``span`` may be smaller
than ``ring``: the ring is sized for the longest length of the request, the rule's span grows
with the current length.

Kernel: the work list is static per layer, ``(KV head, first slot)`` items of ``chunk`` slots
covering every head's capacity; the grid is ``(item, sequence)``.  Long heads get many items,
short heads few, so the launch stays balanced however different the heads are.  The chunk is
picked per batch (:func:`moaplan.kernels.layout.default_chunk`: about two programs per SM,
in chunks of a power of two up to ``_MAX_CHUNK`` slots; on an H200 that was the fastest chunk
at batch 1 / 128K and as fast as any at batch 8 / 32K).  One program loads each K/V
tile once for all query heads of its GQA group (packed into one ``tl.dot`` tile), and writes a
partial output with its log-sum-exp for the group's real rows; a second small kernel, one
program per (query head, sequence), merges that head's partials ``_MERGE_BLOCK`` at a time, so
a long head split into hundreds of items costs a few vector steps rather than a serial walk.

Compensation token (RazorAttention), for the heads ``layout.compensate`` marks: the query drops
the tokens that left the ring (or were never stored) and the ring's filled slots older than
``span``.  The cache keeps fp32 running sums of the first kind per (sequence, head)
(``evicted``).  The second kind are consecutive in ring-age order, so they form at most two
slot ranges (``_stale_slots``): after its attention loop, which is the plain one, a work item
of a compensating head sums the stale slots it covers in a second short loop, and the merge
adds the sums of just the items those ranges touch, after its plain loop, then folds in one
extra entry per query head: key ``mean K``, value ``mean V``, logit ``q . mean K * scale +
log(count)`` with ``count = max(0, n - sink - span)``.  Layers without compensating heads
launch the kernels without that code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moaplan.errors import ModelError
from moaplan.kernels.common import LOG2E, SCORE_ELEMENTS, use_triton
from moaplan.kernels.layout import DecodeLayout, slot_positions
from moaplan.rules import visible

# Partials the merge reduces per step.
_MERGE_BLOCK = 32


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel: key tile rows, warps, pipeline stages."""

    # The H100 sweep's best launch at both measured shapes.  On the H200, per layer in a
    # stack, the best at batch 8 / 32K; at batch 1 / 128K 3 stages were 2% faster, but 13%
    # slower at batch 8 / 32K with 2048-slot chunks.  benchmarks/bench_decode.py sweeps it.
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _stale_slots(n, sink, ring, span):
    """The ring's filled slots older than ``span`` (dropped by a compensating head) after
    ``n`` tokens, as two slot ranges ``[a1, b1)`` and ``[a2, b2)`` (either may be empty; the
    second, where the ages wrap around the ring's end, lies before the first)."""
    n_ring = tl.minimum(tl.maximum(n - sink, 0), ring)
    n_stale = tl.maximum(n_ring - span, 0)
    newest = tl.maximum(n - 1 - sink, 0) % ring
    oldest = (newest + 1 - n_ring + ring) % ring
    end = tl.minimum(oldest + n_stale, ring)
    return sink + oldest, sink + end, sink, sink + oldest + n_stale - end


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, part_ks_ptr, part_vs_ptr,
    offsets_ptr, sinks_ptr, rings_ptr, items_ptr, n_seen_ptr, span_ptr, comp_ptr,
    stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kd,
    stride_vb, stride_vt, stride_vd, n_items, n_kv_heads, chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_COMP: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    # Partials keep the group's real rows only (not the dot tile's padding rows).
    real = offs_g < GROUP
    row = (b * n_items + item).to(tl.int64) * GROUP + offs_g
    tl.store(part_lse_ptr + row, lse, mask=real)
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=real[:, None])
    if HAS_COMP:
        if tl.load(comp_ptr + head) != 0:
            # The stale slots of this item: its share of the (at most two) stale ranges,
            # walked as one concatenated index range.
            a1, b1, a2, b2 = _stale_slots(n, sink, ring, span)
            a1 = tl.maximum(a1, start)
            b1 = tl.maximum(tl.minimum(b1, end), a1)
            a2 = tl.maximum(a2, start)
            b2 = tl.maximum(tl.minimum(b2, end), a2)
            n1 = b1 - a1
            k_stale = tl.zeros([HEAD_DIM], dtype=tl.float32)
            v_stale = tl.zeros([HEAD_DIM], dtype=tl.float32)
            for j0 in range(0, n1 + b2 - a2, BLOCK_N):
                j = j0 + offs_n
                rows = (base + tl.where(j < n1, a1 + j, a2 + j - n1)).to(tl.int64)
                take = (j < n1 + b2 - a2)[:, None]
                k = tl.load(k_base + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                            mask=take, other=0.0)
                v = tl.load(v_base + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                            mask=take, other=0.0)
                k_stale += tl.sum(k.to(tl.float32), 0)
                v_stale += tl.sum(v.to(tl.float32), 0)
            at = (b * n_items + item).to(tl.int64) * HEAD_DIM + offs_d
            tl.store(part_ks_ptr + at, k_stale)
            tl.store(part_vs_ptr + at, v_stale)


@triton.jit
def _merge_kernel(
    part_o_ptr, part_lse_ptr, part_ks_ptr, part_vs_ptr, out_ptr, first_ptr, count_ptr,
    q_ptr, ev_k_ptr, ev_v_ptr, comp_ptr, sinks_ptr, rings_ptr, n_seen_ptr, span_ptr,
    stride_ob, stride_oh, stride_od, stride_qb, stride_qh, stride_qd, n_items, n_kv_heads,
    chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_I: tl.constexpr, HAS_COMP: tl.constexpr,
):
    """One program per (query head, sequence): merges ``BLOCK_I`` partials per step."""
    q_head = tl.program_id(0)
    b = tl.program_id(1)
    head = q_head // GROUP
    first = tl.load(first_ptr + head)
    count = tl.load(count_ptr + head)
    offs_i = tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, HEAD_DIM)
    item_base = b.to(tl.int64) * n_items + first
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for i0 in range(0, count, BLOCK_I):
        valid = i0 + offs_i < count
        row = (item_base + i0 + offs_i) * GROUP + q_head % GROUP
        lse = tl.load(part_lse_ptr + row, mask=valid, other=float("-inf"))
        o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        # All partials so far empty: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        l_i = l_i * alpha + tl.sum(w, 0)
        m_i = m_new
    if HAS_COMP:
        n = tl.load(n_seen_ptr + b)
        sink = tl.load(sinks_ptr + head)
        span = tl.load(span_ptr + b * n_kv_heads + head)
        dropped = n - sink - span
        if (tl.load(comp_ptr + head) != 0) & (dropped > 0):
            # The compensation entry: the evicted sums (the cache's) plus the stale sums of
            # the items that hold stale slots (item j of the head starts at slot j * chunk).
            # The second range lies before the first; they may share one item, read once.
            a1, b1, a2, b2 = _stale_slots(n, sink, tl.load(rings_ptr + head), span)
            e2 = tl.where(b2 > a2, tl.cdiv(b2, chunk), 0)
            n2 = tl.maximum(e2 - a2 // chunk, 0)
            i1 = tl.maximum(a1 // chunk, e2)
            n1 = tl.maximum(tl.where(b1 > a1, tl.cdiv(b1, chunk), 0) - i1, 0)
            ev = (b * n_kv_heads + head) * HEAD_DIM + offs_d
            k_sum = tl.load(ev_k_ptr + ev)
            v_sum = tl.load(ev_v_ptr + ev)
            for j0 in range(0, n1 + n2, BLOCK_I):
                j = j0 + offs_i
                items = item_base + tl.where(j < n1, i1 + j, a2 // chunk + j - n1)
                at = items[:, None] * HEAD_DIM + offs_d[None, :]
                take = (j < n1 + n2)[:, None]
                k_sum += tl.sum(tl.load(part_ks_ptr + at, mask=take, other=0.0), 0)
                v_sum += tl.sum(tl.load(part_vs_ptr + at, mask=take, other=0.0), 0)
            n_drop = dropped.to(tl.float32)
            q = tl.load(q_ptr + b * stride_qb + q_head * stride_qh + offs_d * stride_qd)
            s = tl.sum(q.to(tl.float32) * k_sum, 0) * (qk_scale / n_drop) + tl.log2(n_drop)
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp2(m_i - m_new)
            w = tl.exp2(s - m_new)
            acc = acc * alpha + (w / n_drop) * v_sum
            l_i = l_i * alpha + w
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + b * stride_ob + q_head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty))


def _check(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, layout: DecodeLayout,
           n_seen: torch.Tensor, span: torch.Tensor,
           evicted: tuple[torch.Tensor, torch.Tensor] | None) -> None:
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
    if layout.has_compensation and (evicted is None or any(
            x.shape != (batch, n_kv, head_dim) or x.dtype != torch.float32 for x in evicted)):
        raise ModelError(f"a layout with compensating heads needs evicted=(key sums, value "
                         f"sums), float32 [{batch}, {n_kv}, {head_dim}] each")


def decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    layout: DecodeLayout,
    n_seen: torch.Tensor,
    span: torch.Tensor,
    *,
    scale: float | None = None,
    evicted: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """One decode step of one layer over its compressed cache.

    ``q``: ``[B, Hq, D]`` (the new token of each sequence, already written to the cache);
    ``k_buf``/``v_buf``: ``[B, C, D]`` laid out by ``layout``; ``n_seen``: int ``[B]`` real
    tokens written per sequence (the query is token ``n_seen - 1``); ``span``: int
    ``[B, Hkv]`` the rule's span at that length; ``evicted``: float32 ``(key sums, value
    sums)`` ``[B, Hkv, D]`` of the tokens each head no longer holds (needed, and read only,
    for the heads ``layout.compensate`` marks).  Returns ``[B, Hq, D]`` in ``q.dtype``; a
    sequence with nothing visible gets zeros.  ``backend``: ``"triton"``, ``"torch"`` or
    ``"auto"`` (Triton on CUDA tensors, torch elsewhere).
    """
    _check(q, k_buf, v_buf, layout, n_seen, span, evicted)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(backend, q):
        return _decode_torch(q, k_buf, v_buf, layout, n_seen, span, scale, evicted)
    return _decode_triton(q, k_buf, v_buf, layout, n_seen, span, scale, evicted,
                          config or DecodeConfig())


def _decode_triton(q, k_buf, v_buf, layout, n_seen, span, scale, evicted, cfg) -> torch.Tensor:
    batch, n_q_heads, head_dim = q.shape
    group = n_q_heads // layout.num_kv_heads
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    n_items = layout.items.shape[0]
    part_o = torch.empty((batch, n_items, group, head_dim), dtype=torch.float32,
                         device=q.device)
    part_lse = torch.empty((batch, n_items, group), dtype=torch.float32, device=q.device)
    comp = layout.has_compensation
    if comp:  # per-item sums of the ring's stale slots (written for compensating heads)
        part_ks, part_vs = (torch.empty((batch, n_items, head_dim), dtype=torch.float32,
                                        device=q.device) for _ in range(2))
        ev_k, ev_v = (x.contiguous() for x in evicted)
    else:
        part_ks = part_vs = ev_k = ev_v = part_lse  # never read
    out = torch.empty_like(q)
    n_seen = n_seen.to(torch.int32)
    span = span.to(torch.int32).contiguous()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kernel[(n_items, batch)](
        q, k_buf, v_buf, part_o, part_lse, part_ks, part_vs,
        layout.offsets, layout.sinks, layout.rings, layout.items, n_seen, span, layout.compensate,
        *q.stride(), *k_buf.stride(), *v_buf.stride(), n_items, layout.num_kv_heads,
        layout.chunk, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_N=cfg.block_n, HAS_COMP=comp,
        DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _merge_kernel[(n_q_heads, batch)](
        part_o, part_lse, part_ks, part_vs, out, layout.first_item, layout.item_count,
        q, ev_k, ev_v, layout.compensate, layout.sinks, layout.rings, n_seen, span,
        *out.stride(), *q.stride(), n_items, layout.num_kv_heads, layout.chunk, scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_I=_MERGE_BLOCK, HAS_COMP=comp, num_warps=4,
    )
    return out


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logit soft-capping as Gemma 2 applies it (identity for None)."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor,
                     scale: float,
                     dropped: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """Plain torch attention of one KV head's queries ``q [B, G, T, D]`` over ``k``, ``v``
    ``[B, K, D]`` where ``ok`` (bool, broadcast to ``[B, G, T, K]``) allows, in ``q``'s dtype.

    ``dropped``: ``(key sums, value sums, count)`` of the keys each query drops, ``[B, T, D]``,
    ``[B, T, D]`` and ``[B, T]``, for the compensation token (one extra entry: the means, its
    weight times the count; none where the count is 0).  A row with nothing to attend is 0.
    ``softcap``: Gemma 2's logit soft-capping, ``softcap * tanh(score / softcap)``.
    """
    scores = soft_cap(torch.einsum("bgtd,bkd->bgtk", q, k) * scale, softcap)
    scores = scores.masked_fill(~ok, float("-inf"))
    if dropped is not None:
        k_sum, v_sum, count = dropped
        count = count.to(q.dtype)
        n = count.clamp(min=1)[..., None]
        extra = (soft_cap(torch.einsum("bgtd,btd->bgt", q, k_sum / n) * scale, softcap)
                 + count.log()[:, None])
        scores = torch.cat([scores, extra[..., None]], -1)  # log(0) = -inf: no entry
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bgtk,bkd->bgtd", probs[..., :k.shape[1]], v)
    if dropped is not None:
        out = out + probs[..., k.shape[1]:] * (v_sum / n)[:, None]
    return out


def _decode_torch(q, k_buf, v_buf, layout, n_seen, span, scale, evicted) -> torch.Tensor:
    """The same function in plain torch, one KV head at a time (the CPU path)."""
    batch, n_q_heads, head_dim = q.shape
    n_kv = layout.num_kv_heads
    group = n_q_heads // n_kv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n_seen = n_seen.to(torch.int64)
    span = span.to(torch.int64)
    out = torch.empty_like(q)
    for h in range(n_kv):
        first, cap = layout.head_slots(h)
        sink = int(layout.sinks[h])
        pos = slot_positions(sink, cap - sink, n_seen)  # [B, cap]
        ok = (pos >= 0) & visible(sink, span[:, h, None], (n_seen - 1)[:, None], pos)
        k = k_buf[:, first:first + cap].to(compute)
        v = v_buf[:, first:first + cap].to(compute)
        qh = q[:, h * group:(h + 1) * group, None].to(compute)
        dropped = None
        if layout.compensate[h]:
            # Dropped: the evicted tokens and the filled ring slots the span no longer covers.
            stale = ((pos >= 0) & ~ok).to(compute)
            k_sum, v_sum = (ev[:, h].to(compute) + torch.einsum("bk,bkd->bd", stale, x)
                            for ev, x in zip(evicted, (k, v)))
            count = (n_seen - sink - span[:, h]).clamp(min=0)
            dropped = (k_sum[:, None], v_sum[:, None], count[:, None])
        rows = masked_attention(qh, k, v, ok[:, None, None], scale, dropped)
        out[:, h * group:(h + 1) * group] = rows[:, :, 0].to(q.dtype)
    return out


def chunk_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    pos: torch.Tensor, spans: torch.Tensor, layout: DecodeLayout, scale: float,
                    *, cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    evicted: tuple[torch.Tensor, torch.Tensor] | None = None,
                    window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Torch attention of a multi-token chunk (a prefill, a draft being verified, a chat's
    next prompt), one KV head at a time: queries ``[B, Hq, T, D]`` over the tokens a cache
    holds plus the chunk's own keys/values ``[B, Hkv, T, D]``.

    ``pos`` ``[B, T]``: the chunk's real-token positions (``-1`` at padding: zero rows);
    ``spans`` ``[B, T, Hkv]``: each query's span; ``cached``: ``(keys, values, n_real)`` of a
    cache laid out by ``layout`` (``[B, C, D]`` each, and the real tokens it holds ``[B]``;
    None: nothing cached before the chunk); ``evicted``: fp32 ``(key sums, value sums)``
    ``[B, Hkv, D]`` of the tokens compensating heads no longer hold.  ``window`` and
    ``softcap``: the model's own sliding window and logit soft-capping.  Returns ``q.dtype``.
    """
    batch, n_q_heads, n_new, _ = query.shape
    n_kv = layout.num_kv_heads
    group = n_q_heads // n_kv
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_pos = pos[:, :, None]  # [B, T, 1] against keys [B, 1, K]
    out = torch.zeros_like(query)
    for h in range(n_kv):
        sink = int(layout.sinks[h])
        k_pos, k, v = pos, key[:, h], value[:, h]
        if cached is not None:
            keys, values, n_real = cached
            first, cap = layout.head_slots(h)
            k_pos = torch.cat([slot_positions(sink, cap - sink, n_real), pos], 1)
            k = torch.cat([keys[:, first:first + cap], k], 1)
            v = torch.cat([values[:, first:first + cap], v], 1)
        kp = k_pos[:, None, :]
        causal = (kp >= 0) & (q_pos >= 0) & (kp <= q_pos)  # [B, T, K]
        if window is not None:
            causal &= q_pos - kp < window
        ok = causal & visible(sink, spans[:, :, h, None], q_pos, kp)
        qh = query[:, h * group:(h + 1) * group].to(compute)
        k, v = k.to(compute), v.to(compute)
        dropped = None
        if layout.compensate[h]:
            # The chunk's and the cache's dropped tokens, plus those already evicted.
            hidden = (causal & ~ok).to(compute)
            dropped = tuple(torch.einsum("btk,bkd->btd", hidden, x) + total[:, h, None]
                            for x, total in zip((k, v), evicted))
            dropped += ((pos + 1 - sink - spans[:, :, h]).clamp(min=0),)
        step = max(1, SCORE_ELEMENTS // max(1, batch * group * k.shape[1]))
        for lo in range(0, n_new, step):
            hi = min(lo + step, n_new)
            part = None if dropped is None else tuple(x[:, lo:hi] for x in dropped)
            out[:, h * group:(h + 1) * group, lo:hi] = masked_attention(
                qh[:, :, lo:hi], k, v, ok[:, None, lo:hi], scale, part, softcap).to(query.dtype)
    return out
