"""One decode step's cache write in one launch: each sequence's newest token into the slots its
KV heads keep, and every head's span at the new length.

A decode step of ``MoaplanCache`` otherwise costs some forty small torch kernels per layer
(slot arithmetic, gathers for the compensation sums, the two scatters, the span formula);
their launch overhead, not the GPU, set the speed of end-to-end decoding
(benchmarks/NOTES_decode.md).  The torch version in ``moaplan.runtime.cache`` stays
the CPU path and the oracle.

The slot layout is the one of :mod:`moaplan.kernels.decode`: head ``h``'s token at position
``p`` sits in slot ``offset[h] + p`` if ``p < sink[h]``, else in ring slot
``offset[h] + sink[h] + (p - sink[h]) % ring[h]``.  The ring token a write overwrites joins a
compensating head's fp32 sums first.  Padding rows (``real`` False) write nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moaplan.kernels.decode import DecodeLayout


@dataclass(frozen=True)
class SpanTable:
    """One layer's rule coefficients per KV head, on the device:
    ``span(n) = n`` if ``full`` else ``clamp(floor(alpha + beta n + 1/2), min_span,
    min(max_span, n))`` (float64 arithmetic, as :func:`moaplan.rules.rule_spans`)."""

    full: torch.Tensor  # bool [Hkv]
    alpha: torch.Tensor  # float64 [Hkv]
    beta: torch.Tensor  # float64 [Hkv]
    min_span: torch.Tensor  # int64 [Hkv]
    max_span: torch.Tensor  # int64 [Hkv]

    def spans(self, n: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv]`` int64 spans at real lengths ``n`` (``[B]``), in torch."""
        n = n.to(torch.int64)[:, None]
        raw = torch.floor(self.alpha + self.beta * n.to(torch.float64) + 0.5).to(torch.int64)
        span = torch.minimum(torch.maximum(raw, self.min_span), torch.minimum(self.max_span, n))
        return torch.where(self.full, n, span)


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
    raw = tl.floor(tl.load(ALPHA + h) + tl.load(BETA + h) * n.to(tl.float64) + 0.5).to(tl.int64)
    span = tl.minimum(tl.maximum(raw, tl.load(MIN_SPAN + h)), tl.minimum(tl.load(MAX_SPAN + h), n))
    span = tl.where(tl.load(FULL + h) != 0, n, span)
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
                 table: SpanTable) -> torch.Tensor:
    """Writes the newest token of every sequence, ``key``/``value`` ``[B, Hkv, 1, D]`` (any
    strides), into the layer's buffers ``keys``/``values`` ``[B, C, D]`` (contiguous) and, for
    compensating heads, adds the ring token it overwrites to ``key_sum``/``value_sum``
    ``[B, Hkv, D]`` (fp32).  ``n_after`` ``[B]``: real lengths including the token; ``real``
    ``[B]`` bool, False where the token is padding (None: all real).  Returns the heads' spans
    at ``n_after``, int32 ``[B, Hkv]``.  One launch, no host sync."""
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
