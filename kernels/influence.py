"""Triton kernel: blockwise attention influence |E| for the profiler (GPU path).

A FlashAttention-backward-style pass over the causal tiles of each KV head: one program per
(batch x KV head, ``row_blocks`` query blocks) loops over the GQA group's query heads and over
key blocks ``0..qb``, recomputes ``P = exp(S - lse)`` and ``G = dO V^T`` tile by tile, and reduces
``|E| = |P (G - D)| / (1 - P + EPS)`` over each ``block x block`` tile into two numbers
(part 0: ``i mod b >= j mod b``; part 1: the rest), added with atomics into ``far[h, qb - kb]``
and, for key blocks below the sink table's size, into ``sink[h, kb, qb - kb]``, ``h`` the query
head (its KV head's sums are the group's).  Only entries with ``j < i`` count (see
:mod:`moaplan.profile.influence`, the torch twin and its contract).

It emits the summary only; ``dq, dk, dv`` come from the attention backward the caller runs.
Query blocks are scheduled longest first so the last wave is short.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moaplan.kernels.common import LOG2E


@triton.jit
def _influence_kernel(
    Q, K, V, DO, LSE, DELTA, FAR, SINK,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n, nblk, kv_heads, head_dim, qk_scale,
    GROUP: tl.constexpr, BLOCK: tl.constexpr, ROW_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SINK: tl.constexpr, EPSILON: tl.constexpr, IEEE: tl.constexpr,
):
    # A program owns ROW_BLOCKS consecutive query blocks (a taller tile halves the K/V reads)
    # and splits each tile's sums per query block.  LSE holds log2-sum-exp, so exp2 applies.
    BLOCK_M: tl.constexpr = ROW_BLOCKS * BLOCK
    last = tl.cdiv(nblk, ROW_BLOCKS) - 1
    qb0 = (last - tl.program_id(0)) * ROW_BLOCKS  # the longest rows first
    bh = tl.program_id(1)
    b = bh // kv_heads
    h = bh % kv_heads
    r = tl.arange(0, BLOCK)
    offs_m = qb0 * BLOCK + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)  # head_dim padded to a power of two
    d_ok = offs_d < head_dim
    row_ok = offs_m < n
    lower = r[None, :] <= (offs_m % BLOCK)[:, None]  # part 0: i mod b >= j mod b
    qbs = qb0 + tl.arange(0, ROW_BLOCKS)  # the query blocks of this program
    k_ptr = K + b * stride_kb + h * stride_kh + offs_d[:, None]
    v_ptr = V + b * stride_vb + h * stride_vh + offs_d[:, None]
    precision: tl.constexpr = "ieee" if IEEE else "tf32"
    last_kb = tl.minimum(qb0 + ROW_BLOCKS, nblk) - 1
    for g in range(GROUP):
        hq = h * GROUP + g
        far_row = FAR + hq * nblk * 2
        sink_row = SINK + hq * NUM_SINK * nblk * 2
        q = tl.load(Q + b * stride_qb + hq * stride_qh + offs_m[:, None] * stride_qn
                    + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + b * stride_ob + hq * stride_oh + offs_m[:, None] * stride_on
                     + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        row = (b * kv_heads * GROUP + hq) * n + offs_m
        lse = tl.load(LSE + row, mask=row_ok, other=0.0)
        dlt = tl.load(DELTA + row, mask=row_ok, other=0.0)
        for kb in range(0, last_kb + 1):
            offs_n = kb * BLOCK + r
            tile_ok = d_ok[:, None] & (offs_n < n)[None, :]
            kt = tl.load(k_ptr + offs_n[None, :] * stride_kn, mask=tile_ok, other=0.0)
            vt = tl.load(v_ptr + offs_n[None, :] * stride_vn, mask=tile_ok, other=0.0)
            p = tl.exp2(tl.dot(q, kt, input_precision=precision) * qk_scale - lse[:, None])
            grad = tl.dot(do, vt, input_precision=precision)
            e = tl.abs(p * (grad - dlt[:, None])) / (1.0 - p + EPSILON)
            e = tl.where((offs_n[None, :] < offs_m[:, None]) & row_ok[:, None], e, 0.0)
            # Both parts summed directly, so an empty part is exactly 0.
            part0 = tl.sum(tl.reshape(tl.sum(tl.where(lower, e, 0.0), 1), (ROW_BLOCKS, BLOCK)), 1)
            part1 = tl.sum(tl.reshape(tl.sum(tl.where(lower, 0.0, e), 1), (ROW_BLOCKS, BLOCK)), 1)
            delta = qbs - kb
            ok = (delta >= 0) & (qbs < nblk)
            tl.atomic_add(far_row + delta * 2, part0, mask=ok)
            tl.atomic_add(far_row + delta * 2 + 1, part1, mask=ok)
            if kb < NUM_SINK:
                tl.atomic_add(sink_row + (kb * nblk + delta) * 2, part0, mask=ok)
                tl.atomic_add(sink_row + (kb * nblk + delta) * 2 + 1, part1, mask=ok)


def influence_summary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                      lse: torch.Tensor, delta: torch.Tensor, scale: float, block: int,
                      far: torch.Tensor, sink: torch.Tensor, eps: float = 1e-6, *,
                      row_blocks: int = 4, num_warps: int = 8, num_stages: int = 2) -> None:
    """Add the blockwise ``|E|`` of causal attention into ``far`` and ``sink`` (in place).

    ``q, do: [B, Hq, N, d]``; ``k, v: [B, Hkv, N, d]`` (last dim contiguous); ``lse``: natural
    log-sum-exp of the scaled scores, ``[B, Hq, N]`` float32; ``delta = (dO * O).sum(-1)``,
    ``[B, Hq, N]`` float32; ``far: [Hq, nblk, 2]`` and ``sink: [Hq, K, nblk, 2]`` float32,
    contiguous, one row per query head, ``nblk = ceil(N / block)`` (the batch is summed into
    them).  ``block`` is a power of two >= 16 (a ``tl.dot`` tile side).  ``row_blocks`` query
    blocks share a program (a power of two); it and the launch parameters change the speed,
    never the result.
    """
    batch, q_heads, n, head_dim = q.shape
    kv_heads = k.shape[1]
    nblk = -(-n // block)
    if far.shape != (q_heads, nblk, 2) or sink.shape[::2] != (q_heads, nblk):
        raise ValueError(f"summary buffers {tuple(far.shape)}, {tuple(sink.shape)} do not fit "
                         f"{q_heads} query heads x {nblk} blocks")
    for t in (q, k, v, do):
        if t.stride(-1) != 1:
            raise ValueError("q, k, v and do need a contiguous last dimension")
    lse2 = (lse.float() * LOG2E).contiguous()
    delta = delta.float().contiguous()
    grid = (triton.cdiv(nblk, row_blocks), batch * kv_heads)
    _influence_kernel[grid](
        q, k, v, do, lse2, delta, far, sink,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        n, nblk, kv_heads, head_dim, scale * LOG2E,
        GROUP=q_heads // kv_heads, BLOCK=block, ROW_BLOCKS=row_blocks, NUM_SINK=sink.shape[1],
        HEAD_DIM=max(16, triton.next_power_of_2(head_dim)),
        EPSILON=eps, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
