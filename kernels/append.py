"""The cache writes in one launch each: a decode step's (each sequence's newest token into the
slots its KV heads keep, and every head's span at the new length), and a chunk's (its rows
into the slots that hold them, :func:`write_slots`).

A decode step of ``MoaplanCache`` otherwise costs some forty small torch kernels per layer
(slot arithmetic, gathers for the compensation sums, the two scatters, the span formula);
their launch overhead, not the GPU, set the speed of end-to-end decoding
(benchmarks/NOTES_decode.md).  The torch version below stays the CPU path and the oracle;
:func:`append_token` picks one of the two.

The slot layout is the one of :mod:`moaplan.kernels.layout`: head ``h``'s token at position
``p`` sits in slot ``offset[h] + p`` if ``p < sink[h]``, else in ring slot
``offset[h] + sink[h] + (p - sink[h]) % ring[h]``.  The ring token a write overwrites joins a
compensating head's fp32 sums first.  Padding rows (``real`` False) write nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moaplan.kernels.common import use_triton
from moaplan.kernels.layout import DecodeLayout, RuleTable, rule_span


@triton.jit
def _append_kernel(
    KEY, VALUE, KEYS, VALUES, K_SUM, V_SUM, N_AFTER, REAL, SPANS,
    OFFSETS, SINKS, RINGS, COMP, FULL, ALPHA, BETA, MIN_SPAN, MAX_SPAN,
    stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
    capacity, n_heads, head_dim,
    BLOCK_D: tl.constexpr, HAS_REAL: tl.constexpr, HAS_COMP: tl.constexpr,
):
    """Grid ``(B, Hkv)``: program ``(b, h)`` writes head ``h``'s copy of sequence ``b``'s newest
    token and its span at the new length ``n_after[b]``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(N_AFTER + b).to(tl.int64)
    span = rule_span(n, tl.load(FULL + h), tl.load(ALPHA + h), tl.load(BETA + h),
                     tl.load(MIN_SPAN + h), tl.load(MAX_SPAN + h))
    tl.store(SPANS + b * n_heads + h, span.to(tl.int32))

    real = True
    if HAS_REAL:
        real = tl.load(REAL + b) != 0
    if real:
        pos = n - 1
        sink = tl.load(SINKS + h).to(tl.int64)
        ring = tl.load(RINGS + h).to(tl.int64)
        local = tl.where(pos < sink, pos, sink + (pos - sink) % tl.maximum(ring, 1))
        row = b.to(tl.int64) * capacity + tl.load(OFFSETS + h) + local
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d < head_dim
        slot_k = KEYS + row * head_dim + offs_d
        slot_v = VALUES + row * head_dim + offs_d
        if HAS_COMP:
            if (tl.load(COMP + h) != 0) & (pos >= sink + ring):  # the ring overwrites a token
                at = (b * n_heads + h).to(tl.int64) * head_dim + offs_d
                old_k = tl.load(slot_k, mask=in_d, other=0.0).to(tl.float32)
                old_v = tl.load(slot_v, mask=in_d, other=0.0).to(tl.float32)
                tl.store(K_SUM + at, tl.load(K_SUM + at, mask=in_d) + old_k, mask=in_d)
                tl.store(V_SUM + at, tl.load(V_SUM + at, mask=in_d) + old_v, mask=in_d)
        key = tl.load(KEY + b.to(tl.int64) * stride_kb + h * stride_kh + offs_d * stride_kd,
                      mask=in_d)
        value = tl.load(VALUE + b.to(tl.int64) * stride_vb + h * stride_vh + offs_d * stride_vd,
                        mask=in_d)
        tl.store(slot_k, key.to(KEYS.dtype.element_ty), mask=in_d)
        tl.store(slot_v, value.to(VALUES.dtype.element_ty), mask=in_d)


def append_token(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, key_sum: torch.Tensor, value_sum: torch.Tensor,
                 layout: DecodeLayout, n_after: torch.Tensor, real: torch.Tensor | None,
                 table: RuleTable, *, backend: str = "auto") -> torch.Tensor:
    """Writes the newest token of every sequence, ``key``/``value`` ``[B, Hkv, 1, D]`` (any
    strides), into the layer's buffers ``keys``/``values`` ``[B, C, D]`` (contiguous) and, for
    compensating heads, adds the ring token it overwrites to ``key_sum``/``value_sum``
    ``[B, Hkv, D]`` (fp32).  ``n_after`` ``[B]``: real lengths including the token; ``real``
    ``[B]`` bool, False where the token is padding (None: all real).  Returns the heads' spans
    at ``n_after``, ``[B, Hkv]`` (int32 from the kernel: one launch, no host sync; int64 from
    the torch version).  ``backend``: as :func:`moaplan.kernels.common.use_triton`."""
    if not use_triton(backend, keys):
        return _append_torch(key, value, keys, values, key_sum, value_sum, layout, n_after,
                             real, table)
    batch, n_heads, _, head_dim = key.shape
    spans = torch.empty((batch, n_heads), dtype=torch.int32, device=key.device)
    comp = layout.has_compensation
    _append_kernel[(batch, n_heads)](
        key, value, keys, values, key_sum if comp else keys, value_sum if comp else keys,
        n_after, real if real is not None else n_after, spans,
        layout.offsets, layout.sinks, layout.rings, layout.compensate,
        table.full, table.alpha, table.beta, table.min_span, table.max_span,
        key.stride(0), key.stride(1), key.stride(3), value.stride(0), value.stride(1),
        value.stride(3), layout.capacity, n_heads, head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), HAS_REAL=real is not None, HAS_COMP=comp,
        num_warps=1,
    )
    return spans


def _append_torch(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, key_sum: torch.Tensor, value_sum: torch.Tensor,
                  layout: DecodeLayout, n_after: torch.Tensor, real: torch.Tensor | None,
                  table: RuleTable) -> torch.Tensor:
    """The same write in torch: each sequence's token at position ``n_after - 1`` (nothing
    where ``real`` is False); the ring token it overwrites (at ``pos - ring``) joins a
    compensating head's sums."""
    batch, capacity = keys.shape[0], layout.capacity
    if real is None:
        real = torch.ones(batch, dtype=torch.bool, device=n_after.device)
    pos = n_after - 1  # for padding rows the previous token, rewritten with its old content
    rows = (layout.slots(pos.clamp(min=0))
            + torch.arange(batch, device=pos.device)[:, None] * capacity).reshape(-1)
    keep = real[:, None, None]
    evicts = (real[:, None] & (pos[:, None] >= layout.sinks + layout.rings)
              & layout.compensate.to(torch.bool))[..., None]
    for buf, total, new in ((keys, key_sum, key), (values, value_sum, value)):
        flat = buf.view(batch * capacity, -1)
        old = flat[rows].view_as(new[:, :, 0])
        if layout.has_compensation:
            total += torch.where(evicts, old.float(), 0.0)
        merged = torch.where(keep, new[:, :, 0], old)
        flat.index_copy_(0, rows, merged.reshape(len(rows), -1).to(buf.dtype))
    return table.spans(n_after)


@triton.jit
def _write_slots_kernel(
    KEY, VALUE, KEYS, VALUES, HEAD, RANK, INDEX,
    stride_kb, stride_kh, stride_kt, stride_kd, stride_vb, stride_vh, stride_vt, stride_vd,
    capacity, first, n_slots, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B, cdiv(S, BLOCK_S))``: program ``(b, j)`` writes sequence ``b``'s slots
    ``first + j * BLOCK_S ...`` whose rank is >= 0, keys and values alike."""
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    in_s = offs_s < n_slots
    head = tl.load(HEAD + offs_s, mask=in_s, other=0)
    at = b * n_slots + offs_s
    new = in_s & (tl.load(RANK + at, mask=in_s, other=-1) >= 0)
    row = tl.load(INDEX + at, mask=new, other=0)
    mask = new[:, None] & (offs_d < head_dim)[None, :]
    dst = (b * capacity + first + offs_s)[:, None] * head_dim + offs_d[None, :]
    key = tl.load(KEY + b * stride_kb + head[:, None] * stride_kh + row[:, None] * stride_kt
                  + offs_d[None, :] * stride_kd, mask=mask)
    tl.store(KEYS + dst, key.to(KEYS.dtype.element_ty), mask=mask)
    value = tl.load(VALUE + b * stride_vb + head[:, None] * stride_vh + row[:, None] * stride_vt
                    + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(VALUES + dst, value.to(VALUES.dtype.element_ty), mask=mask)


def write_slots(key: torch.Tensor, value: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, first: int, head: torch.Tensor, rank: torch.Tensor,
                index: torch.Tensor, *, backend: str = "auto") -> None:
    """A chunk's write into slots ``first .. first + S - 1`` of the layer's buffers
    ``keys``/``values`` ``[B, C, D]`` (contiguous): slot ``s`` of sequence ``b`` takes row
    ``index[b, s]`` of KV head ``head[s]`` of the chunk ``key``/``value`` ``[B, Hkv, T, D]``
    (any strides) where ``rank[b, s] >= 0``, and keeps its content elsewhere.  ``head`` int64
    ``[S]``, ``rank`` and ``index`` int64 ``[B, S]``.  ``backend``: as
    :func:`moaplan.kernels.common.use_triton`."""
    if not use_triton(backend, keys):
        batch = torch.arange(key.shape[0], device=key.device)[:, None]
        new = (rank >= 0)[..., None]
        for buf, chunk in ((keys, key), (values, value)):
            held = buf[:, first:first + head.numel()]
            torch.where(new, chunk[batch, head, index].to(buf.dtype), held, out=held)
        return
    batch, n_slots, head_dim = key.shape[0], head.numel(), key.shape[3]
    block_s = 64
    _write_slots_kernel[(batch, triton.cdiv(n_slots, block_s))](
        key, value, keys, values, head, rank.contiguous(), index.contiguous(),
        *key.stride(), *value.stride(), keys.shape[1], first, n_slots, head_dim,
        BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
