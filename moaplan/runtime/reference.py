"""The exact masked attention of a plan: the oracle every kernel is tested against.

It builds the rule's boolean mask explicitly (one batch element and one block of queries at a
time, so memory stays bounded) and applies a plain softmax.  It is meant to be obviously
right, not fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moaplan.kernels.common import SCORE_ELEMENTS
from moaplan.kernels.decode import soft_cap
from moaplan.rules import visible


def _per_sequence(value: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """An int or a ``[B]`` tensor as an int64 ``[B]`` tensor."""
    out = torch.as_tensor(value, dtype=torch.int64, device=device)
    if out.ndim == 0:
        return out.expand(batch)
    if out.shape != (batch,):
        raise ValueError(f"expected an int or a tensor of shape [{batch}], got {tuple(out.shape)}")
    return out


def per_query_head(value: torch.Tensor | Sequence[int], hkv: int, group: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """A rule's per-KV-head or per-query-head values (sinks, spans) as int64 ``[Hkv, G]``:
    one per query head, query head ``h * G + g`` belonging to KV head ``h``."""
    flat = torch.as_tensor(value, dtype=torch.int64, device=device).reshape(-1)
    if flat.numel() == hkv * group:
        return flat.reshape(hkv, group)
    if flat.numel() != hkv:
        raise ValueError(f"expected one entry per KV head ({hkv}) or per query head "
                         f"({hkv * group}), got {flat.numel()}")
    return flat[:, None].expand(hkv, group)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    *,
    scale: float | None = None,
    q_offset: int | torch.Tensor = 0,
    seq_lens: torch.Tensor | None = None,
    compensate: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of every query head under its KV head's (sink, span) rule.

    ``q``: ``[B, Hq, Nq, D]``; ``k``, ``v``: ``[B, Hkv, Nk, D]`` with ``Hq`` a multiple of
    ``Hkv`` (query head ``h`` uses KV head ``h // (Hq // Hkv)``); ``sink``, ``span``: int
    ``[Hkv]``, or ``[Hq]`` for a rule per query head (``span >= Nk`` means full).  Query
    ``t`` of sequence ``b`` sits at absolute position ``q_offset + t`` (``q_offset`` an int
    or an int ``[B]``), key ``j`` at ``j``.
    ``seq_lens`` (int ``[B]``) marks right padding: keys at ``j >= seq_lens[b]`` are invisible
    and query rows at positions ``>= seq_lens[b]`` are zeros.  A row that sees no key at all
    is zeros as well.  ``compensate`` (bool or int ``[Hkv]``, default none) marks the heads with
    RazorAttention's compensation token: each query also attends to one extra entry whose key
    and value are the means of the keys and values it drops (real keys ``j <= i`` the rule
    hides), with its weight multiplied by their count (logit ``+ log(count)``); a query that
    drops nothing has no such entry.  ``window``: the model's own sliding window (a local
    layer's), intersected with every rule: query ``i`` sees key ``j`` only if ``i - j < window``.
    ``softcap``: the model's attention logit soft-capping, ``softcap * tanh(score / softcap)``
    on every score (the compensation entry's too, before its count is added).  Computes in
    float32 (float64 for float64 inputs); returns ``q.dtype``.
    """
    batch, hq, nq, dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if k.shape != (batch, hkv, nk, dim) or v.shape[:3] != (batch, hkv, nk):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q "
                         f"{tuple(q.shape)}: expected [B, Hkv, Nk, D]")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} KV heads")
    device = q.device
    group = hq // hkv
    sink, span = (per_query_head(x, hkv, group, device) for x in (sink, span))
    comp = torch.zeros(hkv, dtype=torch.bool, device=device) if compensate is None else (
        torch.as_tensor(compensate, device=device).reshape(-1).to(torch.bool))
    if comp.shape != (hkv,):
        raise ValueError(f"compensate needs one flag per KV head ({hkv}), got "
                         f"{tuple(comp.shape)}")
    offsets = _per_sequence(q_offset, batch, device)
    lens = _per_sequence(nk if seq_lens is None else seq_lens, batch, device)
    scale = dim ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    out = torch.zeros(batch, hkv, group, nq, v.shape[-1], dtype=compute, device=device)
    k_pos = torch.arange(nk, device=device)
    rule_sink, rule_span = sink[:, :, None, None], span[:, :, None, None]  # [Hkv, G, 1, 1]
    chunk = max(1, SCORE_ELEMENTS // max(1, hq * nk))
    for b in range(batch):
        qb = q[b].to(compute).reshape(hkv, group, nq, dim)
        kb, vb = k[b].to(compute), v[b].to(compute)
        key_ok = k_pos < lens[b]
        for start in range(0, nq, chunk):
            stop = min(start + chunk, nq)
            q_pos = (offsets[b] + torch.arange(start, stop, device=device))[:, None]
            real = (k_pos <= q_pos) & key_ok & (q_pos < lens[b])  # padding rows: zeros
            if window is not None:
                real = real & (q_pos - k_pos < window)
            mask = visible(rule_sink, rule_span, q_pos, k_pos) & real  # [Hkv, G, c, Nk]
            qc = qb[:, :, start:stop]
            scores = soft_cap(torch.einsum("hgqd,hkd->hgqk", qc, kb) * scale, softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            if comp.any():
                # The dropped entries of each row, averaged into one extra column.
                dropped = (real & ~mask & comp[:, None, None, None]).to(compute)
                count = dropped.sum(-1)  # [Hkv, G, c]
                mean_k, mean_v = (torch.einsum("hgqk,hkd->hgqd", dropped, x)
                                  / count.clamp(min=1)[..., None] for x in (kb, vb))
                extra = (soft_cap(torch.einsum("hgqd,hgqd->hgq", qc, mean_k) * scale, softcap)
                         + count.log())
                scores = torch.cat([scores, extra[..., None]], -1)  # log(0) = -inf: no entry
            # A row with no visible key is all -inf; its softmax is NaN, and its output is 0.
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            rows = torch.einsum("hgqk,hkd->hgqd", probs[..., :nk], vb)
            if comp.any():
                rows += probs[..., nk:] * mean_v
            out[b, :, :, start:stop] = rows
    return out.reshape(batch, hq, nq, -1).to(q.dtype)
