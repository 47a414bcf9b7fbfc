"""Attention influence |E| and its blockwise summary, in plain torch (the CPU path).

For one head with ``A = softmax(Q K^T * scale)`` (causal), ``O = A V`` and upstream gradient
``dO``: ``G_ij = dO_i . v_j``, ``D_i = dO_i . O_i`` and
``E_ij = -A_ij (G_ij - D_i) / (1 - A_ij + EPS)``, the first-order loss change of masking
entry ``(i, j)`` and renormalising row ``i``.  Note ``A_ij (G_ij - D_i)`` is FlashAttention's
``dS_ij``, so ``E = -dS / (1 - A + EPS)`` falls out of a standard attention backward.

The summary (see :mod:`moaplan.profile` for the contract) has, per query head, ``far[delta, part]``
and ``sink[k, delta, part]``: sums of ``|E|`` over query block ``i // b`` minus key block
``j // b == delta``, split by ``part 0: i mod b >= j mod b`` (token distance ``>= delta * b``)
and ``part 1`` (the rest).  Only entries with ``j < i`` are summed: every rule keeps a query's own
key (spans are >= 1), so the diagonal never counts towards a dropped influence, and its ``E`` is
ill-conditioned (``A_00 = 1`` for the first query).  A KV head's summary is the sum of its GQA
group's (the profile keeps both: the KV heads price the cache's rules, the query heads their
prefill spans).

:func:`naive_influence` and :func:`summarize_dense` build the full ``N x N`` matrix: they are
the test oracle, for small inputs only.  :func:`attention_forward` and
:func:`attention_backward` never hold more than a ``[rows, N]`` slab of scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-6
# Upper bound on float32 score elements in one slab (batch x query heads x rows x keys):
# 2^24 elements are 64 MiB, a few such temporaries per slab.
_SLAB_ELEMENTS = 1 << 24


@dataclass
class BlockSummary:
    """Running sums of ``|E|`` for the heads (query heads, as the profiler fills it) of one
    layer at one length.

    ``far``: ``[heads, num_blocks, 2]``; ``sink``:
    ``[heads, num_sink_blocks, num_blocks, 2]``; float32, on the attention's device.
    """

    far: torch.Tensor
    sink: torch.Tensor

    @classmethod
    def zeros(cls, heads: int, length: int, block: int, num_sink_blocks: int,
              device: torch.device | str = "cpu") -> BlockSummary:
        nblk = -(-length // block)
        return cls(torch.zeros(heads, nblk, 2, device=device),
                   torch.zeros(heads, num_sink_blocks, nblk, 2, device=device))


def naive_influence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """The full ``E`` matrix ``[B, Hq, N, N]`` (the oracle; float64 inside, small inputs only).

    ``q, do: [B, Hq, N, d]``, ``k, v: [B, Hkv, N, d]``.  Entries with ``j > i`` are 0.
    """
    q, k, v, do = (t.double() for t in (q, k, v, do))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    a = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~causal, -torch.inf), -1)
    o = a @ v
    g = do @ v.transpose(-1, -2)
    d = (do * o).sum(-1, keepdim=True)
    return -a * (g - d) / (1 - a + EPS)


def summarize_dense(e: torch.Tensor, block: int, num_sink_blocks: int, heads: int
                    ) -> BlockSummary:
    """Reduce a full ``E`` ``[B, Hq, N, N]`` to the summary of ``heads`` heads, entry by entry
    (the oracle): ``heads = Hq`` per query head, ``heads = Hkv`` per KV head (groups summed)."""
    b, hq, n, _ = e.shape
    summary = BlockSummary.zeros(heads, n, block, num_sink_blocks, e.device)
    summary.far, summary.sink = summary.far.double(), summary.sink.double()
    i = torch.arange(n, device=e.device)[:, None]
    j = torch.arange(n, device=e.device)[None, :]
    strict = j < i
    delta = (i // block - j // block).clamp(min=0)
    part = ((i % block) < (j % block)).long()
    absolute = e.abs().reshape(b, heads, hq // heads, n, n).sum((0, 2))
    for h in range(heads):
        values = absolute[h][strict]
        flat = delta[strict] * 2 + part[strict]
        summary.far[h].view(-1).index_add_(0, flat, values)
        for kb in range(num_sink_blocks):
            in_block = (j // block == kb).expand(n, n)[strict]
            summary.sink[h, kb].view(-1).index_add_(0, flat[in_block], values[in_block])
    return summary


def rows_per_slab(batch: int, q_heads: int, n: int, block: int) -> int:
    """Query rows per slab (a multiple of ``block``) so that a slab's scores stay within
    ``_SLAB_ELEMENTS``; shared with the head scorers, which walk rows the same way."""
    rows = _SLAB_ELEMENTS // max(batch * q_heads * n, 1)
    return max(block, rows // block * block)


def causal_scores(q: torch.Tensor, k: torch.Tensor, r0: int, r1: int, scale: float
                  ) -> torch.Tensor:
    """Masked scores ``[B, Hkv, g, r1 - r0, r1]`` of query rows ``r0:r1`` (keys ``0:r1``)."""
    s = q[..., r0:r1, :] @ k[..., :r1, :].transpose(-1, -2) * scale
    rows = torch.arange(r0, r1, device=q.device)[:, None]
    keys = torch.arange(r1, device=q.device)[None, :]
    return s.masked_fill(keys > rows, -torch.inf)


def grouped_queries(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``q`` as ``[B, Hkv, g, N, d]`` float32 so GQA needs no copy of ``k``/``v``."""
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    return q.float().reshape(b, k.shape[1], group, n, d), group


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention slab by slab: ``(O [B, Hq, N, d] in q's dtype, lse [B, Hq, N] float32)``."""
    b, hq, n, d = q.shape
    qg, _ = grouped_queries(q, k)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    out = torch.empty(qg.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)
    rows = rows_per_slab(b, hq, n, block)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        s = causal_scores(qg, kf, r0, r1, scale)
        lse[..., r0:r1] = torch.logsumexp(s, -1)
        out[..., r0:r1, :] = torch.exp(s - lse[..., r0:r1, None]) @ vf[..., :r1, :]
    return out.reshape(b, hq, n, d).to(q.dtype), lse.reshape(b, hq, n)


def accumulate_block_sums(summary: BlockSummary, e_abs: torch.Tensor, r0: int, block: int
                          ) -> None:
    """Add ``|E|`` of query rows ``r0:r0 + rows`` (``e_abs [heads, rows, keys]``, already summed
    over the batch, zero on and above the diagonal) into ``summary``.

    ``r0`` must be a multiple of ``block``; ``rows`` and ``keys`` are padded to whole blocks.
    """
    hk, rows, keys = e_abs.shape
    nq, nk = -(-rows // block), -(-keys // block)
    e_abs = torch.nn.functional.pad(e_abs, (0, nk * block - keys, 0, nq * block - rows))
    tiles = e_abs.reshape(hk, nq, block, nk, block)
    r = torch.arange(block, device=e_abs.device)
    lower = (r[:, None] >= r[None, :]).to(e_abs.dtype)  # part 0: i mod b >= j mod b
    # Both parts summed directly: a difference of sums would leave rounding noise (even < 0)
    # where a part is empty, e.g. part 1 on the diagonal block.
    sums = torch.einsum("hiajb,abp->hijp", tiles, torch.stack([lower, 1 - lower], -1))

    nblk, num_sink = summary.far.shape[1], summary.sink.shape[1]
    qb = torch.arange(nq, device=e_abs.device)[:, None] + r0 // block
    kb = torch.arange(nk, device=e_abs.device)[None, :]
    delta = (qb - kb).expand(nq, nk)
    valid = delta >= 0
    summary.far.index_add_(1, delta[valid], sums[:, valid].to(summary.far.dtype))
    if num_sink:
        in_sink = valid & (kb < num_sink)
        flat = (kb.expand(nq, nk) * nblk + delta)[in_sink]
        summary.sink.view(hk, num_sink * nblk, 2).index_add_(
            1, flat, sums[:, in_sink].to(summary.sink.dtype))


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, do: torch.Tensor, scale: float,
                       summary: BlockSummary | None, block: int = 64
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of causal attention, adding ``|E|`` into ``summary`` on the way.

    The FlashAttention backward, one slab of query rows at a time in float32:
    ``P = exp(S - lse)``, ``dP = dO V^T`` (= G), ``dS = P (dP - D)``, ``E = -dS / (1 - P + EPS)``.
    """
    b, hq, n, d = q.shape
    qg, group = grouped_queries(q, k)
    dog = do.float().reshape(qg.shape)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    dd = (dog * o.float().reshape(qg.shape)).sum(-1)  # D_i
    lse = lse.float().reshape(qg.shape[:-1])
    dq = torch.empty_like(qg)
    dk = torch.zeros(kf.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    rows = rows_per_slab(b, hq, n, block)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        p = torch.exp(causal_scores(qg, kf, r0, r1, scale) - lse[..., r0:r1, None])
        dp = dog[..., r0:r1, :] @ vf[..., :r1, :].transpose(-1, -2)
        ds = p * (dp - dd[..., r0:r1, None])
        dq[..., r0:r1, :] = ds @ kf[..., :r1, :] * scale
        dk[..., :r1, :] += (ds.transpose(-1, -2) @ qg[..., r0:r1, :]).sum(2, keepdim=True) * scale
        dv[..., :r1, :] += (p.transpose(-1, -2) @ dog[..., r0:r1, :]).sum(2, keepdim=True)
        if summary is not None:
            # In place, the slab is the largest temporary: |dS| / (1 - P + EPS).  Above the
            # diagonal P = dS = 0 already; the diagonal itself is not counted.
            e = ds.abs_().div_(p.neg_().add_(1 + EPS))
            e.diagonal(offset=r0, dim1=-2, dim2=-1).zero_()
            accumulate_block_sums(summary, e.sum(0).flatten(0, 1), r0, block)
    return (dq.reshape(b, hq, n, d).to(q.dtype), dk[:, :, 0].to(k.dtype),
            dv[:, :, 0].to(v.dtype))
