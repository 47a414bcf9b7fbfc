"""A fast torch attention under per-KV-head rules, for devices without the Triton kernel.

The reference attention (:mod:`moaplan.kernels.prefill`) masks every score of a dense
``N x N`` product, which on a CPU is about ten times slower than the dense SDPA kernel.  Here
each KV head's query heads (those of one rule together) are handled by the cheapest exact
call: a full head by one causal SDPA call, a windowed head by one SDPA call per block of
queries over only the keys that block can see (its sinks and the window before it), with a
small boolean mask.  The work of a
windowed head is then proportional to its kept entries, as in the kernel.

It covers the common case (no padding, no compensation token); the caller falls back to the
reference otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moaplan.kernels.prefill import per_query_head
from moaplan.rules import visible

QUERY_BLOCK = 512


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
    *, scale: float | None = None, q_offset: int = 0,
) -> torch.Tensor:
    """``reference_attention(q, k, v, sink, span, scale=scale, q_offset=q_offset)`` for
    unpadded sequences without compensation tokens (shapes as there; ``sink`` and ``span``
    one value per KV head or per query head)."""
    batch, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    sinks, spans = (per_query_head(x, hkv, group).reshape(-1).tolist() for x in (sink, span))
    out = q.new_empty(batch, hq, nq, v.shape[-1])
    # Query heads of one KV head that share a rule go together.
    calls = [(h, first, last) for h in range(hkv) for first, last in
             _same_rule_runs(sinks[h * group:(h + 1) * group], spans[h * group:(h + 1) * group])]
    for h, first, last in calls:
        heads = slice(h * group + first, h * group + last)
        group_size = last - first
        qh, kh, vh = q[:, heads], k[:, h : h + 1], v[:, h : h + 1]
        h_sink, h_span = sinks[heads.start], spans[heads.start]
        if h_sink == 0 and h_span == 0:  # sees nothing: zero rows
            out[:, heads] = 0
            continue
        if h_span >= nk and nq == nk and q_offset == 0:  # a full head: the causal kernel
            out[:, heads] = F.scaled_dot_product_attention(
                qh, kh.expand(-1, group_size, -1, -1), vh.expand(-1, group_size, -1, -1),
                is_causal=True, scale=scale)
            continue
        for start in range(0, nq, QUERY_BLOCK):
            stop = min(start + QUERY_BLOCK, nq)
            out[:, heads, start:stop] = _block(qh, kh, vh, h_sink, h_span, start, stop,
                                               q_offset, scale)
    return out


def _same_rule_runs(sinks: list[int], spans: list[int]) -> list[tuple[int, int]]:
    """``[first, last)`` runs of consecutive query heads with one (sink, span)."""
    runs: list[tuple[int, int]] = []
    for i, rule in enumerate(zip(sinks, spans)):
        if runs and (sinks[runs[-1][0]], spans[runs[-1][0]]) == rule:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, span: int,
           start: int, stop: int, q_offset: int, scale: float | None) -> torch.Tensor:
    """Queries ``start .. stop - 1`` of one KV head's query heads, over the keys they see."""
    first = q_offset + start  # absolute position of the first query
    last = q_offset + stop - 1
    lo = max(0, first - span + 1)  # oldest window key any query of the block sees
    sinks = torch.arange(min(sink, lo), device=q.device)
    window = torch.arange(lo, last + 1, device=q.device)
    k_pos = torch.cat([sinks, window])
    q_pos = torch.arange(first, last + 1, device=q.device)[:, None]
    mask = visible(sink, span, q_pos, k_pos[None])
    group = q.shape[1]
    keys = k[:, :, k_pos].expand(-1, group, -1, -1)
    values = v[:, :, k_pos].expand(-1, group, -1, -1)
    return F.scaled_dot_product_attention(q[:, :, start:stop], keys, values, attn_mask=mask,
                                          scale=scale)
