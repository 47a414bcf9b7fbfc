"""Block-sparse prefill attention in Triton: every KV head keeps its own sink and window.

One launch computes a whole layer.  Query ``t`` of sequence ``b`` sits at absolute position
``i = q_offset[b] + t`` and sees key ``j`` iff ``j <= i and (j < sink[h] or i - j < span[h])``
(``h`` is the query head, or its KV head when the rule is given per KV head; ``span >= Nk`` is
full causal attention; a head with ``sink = span = 0`` sees nothing and costs nothing).  Rows at
positions ``>= seq_lens[b]`` (right padding) come out as zeros.

Each program owns one query block of one query head and works out analytically which key
tiles its rows can see (no tile lookup tables).  Where query heads of a GQA group share one
rule, a program may hold a block of each of several of them (up to ``PrefillConfig.pack``,
:func:`pack_heads`; a group whose heads have their own spans packs those that share one):
every K/V tile it loads then serves them all, and its rows span fewer positions, so a
window's edges waste less.  The tile ranges below are those of the block's rows:

* sink tiles   ``[0, s_end)`` keys below ``sink`` that the window does not already cover;
* window tiles ``[a, d)``    from the tile of the earliest row's first window key to the
                             diagonal tile of the last valid row, split into
  - edge tiles     ``[a, e)``  some rows are out of the window    -> masked,
  - interior tiles ``[e, f)``  every entry is visible             -> mask-free path,
  - diagonal tiles ``[f, d)``  causality cuts the tile            -> masked.

The masked tiles run in one loop (their index ranges are concatenated) and the interior
tiles in another, so the common case pays no masking.  The masked loop may walk its ranges in
narrower tiles (``PrefillConfig.edge_n``): a 64-key sink, or a window's first key, then
wastes less of a tile that is mostly hidden.  The grid walks query blocks from the
last (the most keys under causal attention) to the first and KV heads from the widest to the
narrowest, so the heaviest programs start first and the tail of the launch is made of cheap
ones.  Short programs go block row by block row; long ones (``PrefillConfig.head_major``)
go KV head by KV head, so the programs running together share one head's K/V in L2.  Either
way the query heads of one GQA group are adjacent and read the K/V tiles they share from L2.

Compensation token (RazorAttention): for a compensating KV head, row ``i`` drops exactly the
keys ``[sink, i - span]``, a contiguous range.  A small pre-pass (``_dropped_means_kernel``)
scans each compensating head's keys once in fp32 and writes, per query row, the mean key and
value of the keys it drops (input dtype, zeros where none drop).  The main kernel then folds
them in as one more key tile per ``BLOCK_N`` rows: the dot product of the query block with its
own rows' mean keys, of which only the diagonal (each row's own entry, logit
``q . mean(K) * scale + log(count)``) is kept.  That tile has the shape of a key tile, so the
compensating kernel needs no more registers than the plain one.  Layers without such heads
compile without that step, and plain heads of a mixed layer skip it on one scalar branch.

The torch version, :func:`reference_attention`, is the exact masked attention, the oracle
every kernel is tested against: it builds the rule's boolean mask explicitly (one batch
element and one block of queries at a time, so memory stays bounded) and applies a plain
softmax; it is meant to be obviously right, not fast.  :func:`sparse_attention` runs one or
the other (``backend``, :func:`moaplan.kernels.common.use_triton`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4 builds no host-side descriptors: pointer loads only
    TensorDescriptor = None

from moaplan.errors import ModelError
from moaplan.kernels.common import LOG2E, SCORE_ELEMENTS, use_triton
from moaplan.kernels.decode import soft_cap
from moaplan.rules import visible

HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Query rows per program of the compensation pre-passes.
_MEANS_BLOCK_T = 128


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch parameters of one kernel launch.

    ``head_major`` orders the programs KV head by KV head (every query block of one GQA group
    before the next group) instead of query-block row by row: the programs running together
    then read one head's K/V, which stays in L2.  ``tma`` loads the K/V tiles through tensor
    descriptors (Hopper's TMA unit) where the GPU and the tensors' layout allow, else through
    pointers: on the H200 the dense tiles ran 12% faster that way (NOTES_prefill.md, run 6).
    Up to ``pack`` query heads of one GQA group that share a rule share a program
    (:func:`pack_heads`): its ``block_m`` rows are ``block_m / p`` queries of each of its
    ``p`` heads, so every K/V tile it loads serves them all and a window's edge tiles waste
    less.
    ``edge_n`` (0: ``block_n``) is the key width of the masked tiles (:attr:`masked_n`).
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    head_major: bool = False
    tma: bool = True
    pack: int = 1
    edge_n: int = 0

    def __post_init__(self) -> None:
        n = self.masked_n
        if n < 16 or n & (n - 1) or self.block_n % n:
            raise ValueError(f"edge_n={self.edge_n} must be 0 or a power of two >= 16 that "
                             f"divides block_n={self.block_n}")

    @property
    def masked_n(self) -> int:
        """Key tile width of the masked tiles (sinks, window edges, diagonal): ``edge_n``, a
        power of two dividing ``block_n``, or ``block_n`` where it is 0.  Narrower masked
        tiles compute fewer hidden entries where a window's first key or a short sink falls
        inside a wide tile."""
        return self.edge_n or self.block_n


# Programs that visit at most this many keys are short: their tiles differ (default_config).
SHORT_REACH = 4096


def default_config(head_dim: int, reach: int, shared: int = 1) -> PrefillConfig:
    """Tile shape for a launch; ``reach`` is the most keys any row sees (max sink + span,
    capped at the key count); ``shared`` how many query heads of each GQA group share one
    rule (the group size for per-KV-head rules, 1 where query heads have their own spans).

    Measured in bf16 for head_dim 128 (benchmarks/NOTES_prefill.md, runs 2-13): programs of
    more than :data:`SHORT_REACH` keys run best with 128 x 128 tiles in head-major order,
    packing up to 4 query heads of a group that share a rule (run 8: the mixed plan 2-10%
    faster at 16K-64K; run 13: per-query-head spans, where packs form among the heads that
    share one), and so do those of more than 2048 keys where whole groups pack (runs 10-11:
    2-5% on the near-dense layers of a 4K MoA-like plan, 4-10% on 2K-4K windows at 16K).
    Their masked tiles are 64 keys wide (run 11: 1-5% on 4K-16K MoA-like layers, the mixed
    plan 3% at 16K; a 64-key sink or a window's first key then wastes half as much of its
    tile).  Other short programs finish sooner with 64 x 64 tiles (more, shorter programs and
    less window-edge waste; 6% faster on 512-key windows, 2-5% on 4K per-query-head spans).
    Both tiles load K/V through TMA: timed as CUDA-graph replays on the H200, the 64 x 64
    tiles ran 4-8% faster with it on every layer of a 4K MoA-like plan and on the 4K mixed
    plan (run 7).  Other head dims are untuned.
    """
    if head_dim == 128:
        if reach <= SHORT_REACH and (reach <= 2048 or shared % 4):
            return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
        return PrefillConfig(block_m=128, block_n=128, num_warps=8, num_stages=3,
                             head_major=True, pack=4, edge_n=64)
    return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)


def pack_heads(sinks: Sequence[int], spans: Sequence[int], group: int,
               config: PrefillConfig) -> list[list[int]]:
    """The query heads that share the launch's programs: lists of query heads (one value of
    ``sinks``/``spans`` per query head, ``group`` consecutive ones per KV head), each a power
    of two of them, at most ``config.pack`` and dividing ``config.block_m``, of one group and
    with the same sink and span; every query head in exactly one, a KV head's together.  A
    pack of ``p`` heads computes ``block_m / p`` queries of each per program, so every K/V
    tile it loads serves them all."""
    packs: list[list[int]] = []
    for h0 in range(0, len(sinks), group):
        same_rule: dict[tuple[int, int], list[int]] = {}
        for h in range(h0, h0 + group):
            same_rule.setdefault((sinks[h], spans[h]), []).append(h)
        for heads in same_rule.values():
            while heads:
                size = 1
                while (size * 2 <= min(len(heads), config.pack)
                       and config.block_m % (size * 2) == 0):
                    size *= 2
                packs.append(heads[:size])
                heads = heads[size:]
    return packs


def _program_table(packs: list[list[int]], group: int) -> tuple[list[int], list[int]]:
    """The kernel's ``MEMBERS`` and ``PROGRAMS`` (one entry per query head) from
    :func:`pack_heads`: per KV head, its query heads (as offsets in the group) pack by pack,
    and for program ``j`` of each chunk of ``block_m`` query positions ``member0 | log2(pack)
    << 8 | sub << 16``: its pack starts at ``MEMBERS[member0]`` and it computes the pack's
    ``sub``-th block of ``block_m / pack`` positions (the later blocks first, as the chunks
    go)."""
    members: list[int] = []
    programs: list[int] = []
    for heads in packs:
        member0 = len(members) % group
        members += [h % group for h in heads]
        size = len(heads)
        programs += [member0 | (size.bit_length() - 1) << 8 | (size - 1 - k) << 16
                     for k in range(size)]
    return members, programs


def _uniform_pack(packs: list[list[int]]) -> int:
    """The kernel's ``PACK``: the packs' one size where every pack holds that many query heads
    of consecutive numbers, from a multiple of it (the programs then need no table), else 0."""
    size = len(packs[0])
    regular = all(heads == list(range(heads[0], heads[0] + size)) and heads[0] % size == 0
                  for heads in packs)
    return size if regular else 0


def shared_rule_heads(sinks: Sequence[int], spans: Sequence[int], group: int,
                      n_keys: int) -> int:
    """``group`` where every GQA group's query heads (consecutive in ``sinks``/``spans``, one
    value per query head) share one rule over ``n_keys`` keys, else 1.  Sinks and spans
    compare capped at ``n_keys``: beyond it they all mean every key."""
    rules = [(min(s, n_keys), min(w, n_keys)) for s, w in zip(sinks, spans)]
    uniform = all(len(set(rules[h:h + group])) == 1 for h in range(0, len(rules), group))
    return group if uniform else 1


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, qk_scale, MASKED: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Folds logits ``s`` (before ``qk_scale``; hidden entries -inf) and values ``v`` into the
    online softmax (FlashAttention-2 forward, base 2)."""
    # Scaling after the row max lets the exponent's argument be one fused multiply-add.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        # A row this tile hides completely, with no key seen before, keeps m = -inf; shift
        # by 0 instead so that exp2(-inf - -inf) never makes a NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s * qk_scale - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_tile(base, desc, b, kvh, start, cols, offs_d, stride_n, stride_d, n_keys,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               TMA: tl.constexpr):
    """Key (or value) rows ``cols = start + [0, BLOCK_N)`` of one head, zeros past
    ``n_keys``.  A TMA load (a tensor descriptor over ``[B, Hkv, Nk, D]``) fills rows past
    the end with zeros by itself; a pointer load bounds-checks only where ``MASKED``
    (interior tiles lie inside the keys)."""
    if TMA:
        return desc.load([b, kvh, start, 0]).reshape(BLOCK_N, HEAD_DIM)
    ptrs = base + cols[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASKED:
        return tl.load(ptrs, mask=(cols < n_keys)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _tile_update(acc, m_i, l_i, q, k_base, v_base, desc_k, desc_v, b, kvh,
                 stride_kn, stride_kd, stride_vn, stride_vd,
                 tile, rows, offs_n, offs_d, sink, span, n_keys, qk_scale,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                 TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over key tile ``tile``.

    ``MASKED`` tiles bounds-check their loads and apply the rule; interior tiles skip both.
    ``sink``/``span`` are scalars (one rule for every row) or ``[BLOCK_M, 1]`` (a rule per
    row, where a program packs several query heads).
    """
    start = tile * BLOCK_N
    cols = start + offs_n
    k = _load_tile(k_base, desc_k, b, kvh, start, cols, offs_d, stride_kn, stride_kd, n_keys,
                   BLOCK_N, HEAD_DIM, MASKED, TMA)
    v = _load_tile(v_base, desc_v, b, kvh, start, cols, offs_d, stride_vn, stride_vd, n_keys,
                   BLOCK_N, HEAD_DIM, MASKED, TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        # j visible to i iff 0 <= i - j < limit_j, limit_j = 2^30 for sinks, else span:
        # one unsigned compare per entry (a negative i - j wraps to >= 2^31).
        limit = tl.where(cols[None, :] < sink, 1 << 30, span).to(tl.uint32)
        dist = (rows[:, None] - cols[None, :]).to(tl.uint32, bitcast=True)
        s = tl.where(dist < limit, s, float("-inf"))
    return _softmax_step(acc, m_i, l_i, s, v, qk_scale, MASKED, DOT_PRECISION)


@triton.jit
def _compensation_tile(acc, m_i, l_i, q, mk_base, mv_base, t0, i0, first, offs_m, offs_n,
                       offs_d, sink, span, n_queries, qk_scale, HEAD_DIM: tl.constexpr,
                       rows_per_head, DOT_PRECISION: tl.constexpr):
    """Folds the compensation entries of the block's rows ``first .. first + BLOCK_N - 1``
    into the online softmax: the mean keys of those rows form a key tile whose diagonal
    (row ``r`` against its own mean key) is the only visible part.  Row ``r`` holds query
    ``t0 + r % rows_per_head`` (of the ``r // rows_per_head``-th packed head, which shares
    the mean keys)."""
    cols = first + offs_n  # rows of this block, as columns of the tile
    t = t0 + cols % rows_per_head
    in_rows = (t < n_queries)[:, None]
    at = t[:, None] * HEAD_DIM + offs_d[None, :]
    mean_k = tl.load(mk_base + at, mask=in_rows, other=0.0)
    mean_v = tl.load(mv_base + at, mask=in_rows, other=0.0)
    count = i0 + cols % rows_per_head - span - sink + 1  # keys [sink, i - span] dropped
    # The entry's weight is count times that of one key at the mean: logit + log(count),
    # added before the softmax step multiplies by qk_scale.
    bias = tl.math.log2(tl.maximum(count, 1).to(tl.float32)) / qk_scale
    own = (offs_m[:, None] == cols[None, :]) & (count > 0)[None, :]
    s = tl.dot(q, tl.trans(mean_k), input_precision=DOT_PRECISION) + bias[None, :]
    s = tl.where(own, s, float("-inf"))
    return _softmax_step(acc, m_i, l_i, s, mean_v, qk_scale, True, DOT_PRECISION)


@triton.jit
def _dropped_head(SINK, SPAN, COMP_HEAD, QOFF, slot, n_comp, q_offset, HAS_QOFF: tl.constexpr):
    """Sequence, KV head, sink and ``x0`` (the last key that query row 0 drops) of one
    (sequence, compensating head) slot: row ``t`` drops keys ``[sink, x0 + t]``."""
    b = slot // n_comp
    kvh = tl.load(COMP_HEAD + slot % n_comp)
    if HAS_QOFF:
        q_offset = tl.load(QOFF + b)
    return b, kvh, tl.load(SINK + kvh), q_offset - tl.load(SPAN + kvh)


@triton.jit
def _dropped_rows(base, stride_n, x, sink, n_keys):
    """Key (or value) rows ``x`` of one head's ``BLOCK_D`` columns in fp32; rows that no
    query drops (below the sink, past the keys) read as zeros."""
    take = ((x >= sink) & (x < n_keys))[:, None]
    return tl.load(base[None, :] + x[:, None] * stride_n, mask=take, other=0.0).to(tl.float32)


@triton.jit
def _dropped_sums_kernel(
    K, V, SUMS, SINK, SPAN, COMP_HEAD, QOFF,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    q_offset, n_keys, n_comp,
    HAS_QOFF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """First pass of the dropped-key means: fp32 sums of the keys and values that query rows
    ``block * BLOCK_T ..`` drop beyond the previous row (one key each) in ``SUMS[slot, block
    + 1]``, and of the keys ``[sink, x0)`` that every row drops in ``SUMS[slot, 0]``.
    ``SUMS``: ``[B * n_comp, n_blocks + 1, 2, HEAD_DIM]``.  Grid: (block, slot, columns)."""
    block = tl.program_id(0)
    slot = tl.program_id(1)
    b, kvh, sink, x0 = _dropped_head(SINK, SPAN, COMP_HEAD, QOFF, slot, n_comp, q_offset,
                                     HAS_QOFF)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d * stride_kd
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d * stride_vd
    row = slot.to(tl.int64) * (tl.num_programs(0) + 1) + block + 1
    at = SUMS + row * 2 * HEAD_DIM + offs_d
    x = x0 + block * BLOCK_T + offs_t
    tl.store(at, tl.sum(_dropped_rows(k_base, stride_kn, x, sink, n_keys), 0))
    tl.store(at + HEAD_DIM, tl.sum(_dropped_rows(v_base, stride_vn, x, sink, n_keys), 0))
    if block == 0:
        # Keys [sink, x0): only a chunk far into the sequence has any.
        k_sum = tl.zeros([BLOCK_D], tl.float32)
        v_sum = tl.zeros([BLOCK_D], tl.float32)
        for j0 in range(sink, x0, BLOCK_T):
            j = tl.where(j0 + offs_t < x0, j0 + offs_t, -1)
            k_sum += tl.sum(_dropped_rows(k_base, stride_kn, j, sink, n_keys), 0)
            v_sum += tl.sum(_dropped_rows(v_base, stride_vn, j, sink, n_keys), 0)
        tl.store(at - 2 * HEAD_DIM, k_sum)
        tl.store(at - HEAD_DIM, v_sum)


@triton.jit
def _store_means(out, at, rows, base, stride_n, x, sink, n_keys, carry, inv):
    """Mean of each row's dropped keys: running sum from the previous blocks (``carry``) plus
    the prefix sum inside this block, times ``1 / count``."""
    run = tl.cumsum(_dropped_rows(base, stride_n, x, sink, n_keys), 0) + carry[None, :]
    tl.store(out + at, (run * inv[:, None]).to(out.dtype.element_ty), mask=rows[:, None])


@triton.jit
def _dropped_means_kernel(
    K, V, SUMS, MK, MV, SINK, SPAN, COMP_HEAD, QOFF,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    q_offset, n_queries, n_keys, n_comp,
    HAS_QOFF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Second pass: the mean key and value of the keys each query row of one block drops,
    ``MK``/``MV`` ``[B, n_comp, Nq, HEAD_DIM]`` (zeros for rows that drop nothing).  The
    rows' dropped ranges grow by one key per row, so each is the previous blocks' sums
    (``SUMS``, a few vector loads) plus a prefix sum over this block's keys."""
    block = tl.program_id(0)
    slot = tl.program_id(1)
    b, kvh, sink, x0 = _dropped_head(SINK, SPAN, COMP_HEAD, QOFF, slot, n_comp, q_offset,
                                     HAS_QOFF)
    offs_t = tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    sums = SUMS + slot.to(tl.int64) * (tl.num_programs(0) + 1) * 2 * HEAD_DIM + offs_d
    k_sum = tl.zeros([BLOCK_D], tl.float32)
    v_sum = tl.zeros([BLOCK_D], tl.float32)
    for j0 in range(0, block + 1, BLOCK_S):  # the keys before the block and those before x0
        j = j0 + offs_s
        before = (j <= block)[:, None]
        at = sums[None, :] + j[:, None] * 2 * HEAD_DIM
        k_sum += tl.sum(tl.load(at, mask=before, other=0.0), 0)
        v_sum += tl.sum(tl.load(at + HEAD_DIM, mask=before, other=0.0), 0)
    t = block * BLOCK_T + offs_t
    x = x0 + t
    count = x - sink + 1
    inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1).to(tl.float32), 0.0)
    at = slot.to(tl.int64) * n_queries * HEAD_DIM + t[:, None] * HEAD_DIM + offs_d[None, :]
    rows = t < n_queries
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + offs_d * stride_kd
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + offs_d * stride_vd
    _store_means(MK, at, rows, k_base, stride_kn, x, sink, n_keys, k_sum, inv)
    _store_means(MV, at, rows, v_base, stride_vn, x, sink, n_keys, v_sum, inv)


@triton.jit
def _sparse_prefill_kernel(
    Q, K, V, Out, desc_k, desc_v, desc_ke, desc_ve, SINK, SPAN, HEAD_ORDER, MEMBERS, PROGRAMS,
    QOFF, SEQLENS, COMP_SLOT, MK, MV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on,
    q_offset, n_queries, n_keys, n_comp, qk_scale,
    HQ: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EDGE_N: tl.constexpr,
    HAS_QOFF: tl.constexpr, HAS_SEQLENS: tl.constexpr, HAS_COMP: tl.constexpr,
    HEAD_MAJOR: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Every KV head has GROUP programs per chunk of BLOCK_M query positions: program j of a
    # chunk computes `rows_per_head` queries of each of the query heads it packs, which
    # share one rule (row r: query t0 + r % rows_per_head of head number member0 + r //
    # rows_per_head of its pack), the chunk's sub-th block of them.  PACK heads of
    # consecutive numbers each where every pack of the launch is so; else (PACK == 0) the
    # packs come from a table (:func:`_program_table`), PROGRAMS[kvh * GROUP + j] holding
    # member0 | log2(pack) << 8 | sub << 16 and MEMBERS the heads' numbers in the group.
    if HEAD_MAJOR:  # 1-D grid: program in chunk, then chunk, then (sequence, KV head)
        n_chunks = tl.cdiv(n_queries, BLOCK_M)
        rest = tl.program_id(0) // GROUP
        chunk = n_chunks - 1 - rest % n_chunks  # last chunk first
        unit = rest // n_chunks
        j = tl.program_id(0) % GROUP
    else:  # 2-D grid: (sequence, KV head, program in chunk), then chunk
        unit = tl.program_id(0) // GROUP
        j = tl.program_id(0) % GROUP
        chunk = tl.num_programs(1) - 1 - tl.program_id(1)
    b = unit // (HQ // GROUP)
    kvh = tl.load(HEAD_ORDER + unit % (HQ // GROUP))  # KV heads sorted widest first
    offs_m = tl.arange(0, BLOCK_M)
    if PACK == 0:
        program = tl.load(PROGRAMS + kvh * GROUP + j)
        member0, log_pack, sub = program & 255, (program >> 8) & 255, program >> 16
        rows_per_head = BLOCK_M >> log_pack
        hq = kvh * GROUP + tl.load(MEMBERS + kvh * GROUP + member0 + offs_m // rows_per_head)
        head = kvh * GROUP + tl.load(MEMBERS + kvh * GROUP + member0)
    else:  # no table to read first: the common case costs no extra dependent loads
        rows_per_head: tl.constexpr = BLOCK_M // PACK
        member0 = j // PACK * PACK
        sub = PACK - 1 - j % PACK
        hq = kvh * GROUP + member0 + offs_m // rows_per_head
        head = kvh * GROUP + member0
    # The packed heads share one rule: scalars.
    sink = tl.load(SINK + head)
    span = tl.load(SPAN + head)
    if HAS_QOFF:
        q_offset = tl.load(QOFF + b)
    seq_len = n_keys
    if HAS_SEQLENS:
        seq_len = tl.minimum(tl.load(SEQLENS + b), n_keys)

    # Absolute positions of this block's rows and the last one with a valid query.
    t0 = chunk * BLOCK_M + sub * rows_per_head
    i0 = q_offset + t0
    i_last = i0 + rows_per_head - 1
    hi = tl.minimum(tl.minimum(i_last, seq_len - 1), q_offset + n_queries - 1)
    # A query head with neither sink nor window sees nothing (``routed_attention`` leaves the
    # heads it sends to SDPA so): no tiles, zero rows.
    has_rows = (hi >= i0) & ((sink > 0) | (span > 0))

    # Key-tile ranges (all bounds non-negative, so integer division is floor division), in
    # tiles of BLOCK_N keys; the masked ones are then walked in tiles of EDGE_N keys.
    d = tl.where(has_rows, hi // BLOCK_N + 1, 0)
    lo = tl.maximum(i0 - span + 1, 0)  # earliest window key of any row
    sink_keys = tl.minimum(sink, lo)  # sinks the window does not cover
    s_end = tl.minimum(tl.cdiv(sink_keys, BLOCK_N), d)
    a = tl.minimum(tl.maximum(lo // BLOCK_N, s_end), d)
    first_full = tl.where(i_last >= span, (i_last - span) // BLOCK_N + 1, 0)
    e = tl.minimum(tl.maximum(first_full, a), d)
    f = tl.minimum(tl.maximum((i0 + 1) // BLOCK_N, e), d)
    # The masked ranges in EDGE_N tiles: sink [0, s_sub), edge [a_sub, e_sub), diagonal
    # [f_sub, d_sub).  They stay inside the BLOCK_N tiles above, so the interior tiles [e, f)
    # remain theirs.
    SUB: tl.constexpr = BLOCK_N // EDGE_N
    d_sub = tl.where(has_rows, hi // EDGE_N + 1, 0)
    s_sub = tl.minimum(tl.cdiv(sink_keys, EDGE_N), d_sub)
    a_sub = tl.minimum(tl.maximum(lo // EDGE_N, s_sub), d_sub)
    e_sub = tl.minimum(e * SUB, d_sub)
    f_sub = tl.minimum(f * SUB, d_sub)

    offs_n = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, EDGE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = t0 + offs_m % rows_per_head
    rows = q_offset + q_rows
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + (hq.to(tl.int64) * stride_qh)[:, None]
              + q_rows[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(q_rows < n_queries)[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Masked tiles: sink [0, s_sub), then edge [a_sub, e_sub), then diagonal [f_sub, d_sub),
    # back to back.
    n_edge = e_sub - a_sub
    for idx in range(0, s_sub + n_edge + (d_sub - f_sub)):
        tile = tl.where(idx < s_sub, idx, tl.where(idx < s_sub + n_edge, a_sub + idx - s_sub,
                                                   f_sub + idx - s_sub - n_edge))
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k_base, v_base, desc_ke, desc_ve, b,
                                     kvh, stride_kn, stride_kd, stride_vn, stride_vd, tile,
                                     rows, offs_e, offs_d, sink, span, n_keys, qk_scale, EDGE_N,
                                     HEAD_DIM, True, TMA, DOT_PRECISION)
    for tile in range(e, f):
        acc, m_i, l_i = _tile_update(acc, m_i, l_i, q, k_base, v_base, desc_k, desc_v, b, kvh,
                                     stride_kn, stride_kd, stride_vn, stride_vd, tile, rows,
                                     offs_n, offs_d, sink, span, n_keys, qk_scale, BLOCK_N,
                                     HEAD_DIM, False, TMA, DOT_PRECISION)

    if HAS_COMP:
        comp = tl.load(COMP_SLOT + kvh)
        if comp >= 0:  # MK, MV: [B, n_comp, n_queries, HEAD_DIM], contiguous
            m_off = (b.to(tl.int64) * n_comp + comp) * n_queries * HEAD_DIM
            for first in tl.static_range(0, BLOCK_M, BLOCK_N):
                acc, m_i, l_i = _compensation_tile(acc, m_i, l_i, q, MK + m_off, MV + m_off, t0,
                                                   i0, first, offs_m, offs_n, offs_d, sink,
                                                   span, n_queries, qk_scale, HEAD_DIM,
                                                   rows_per_head, DOT_PRECISION)
    valid = (q_rows < n_queries) & (rows < seq_len)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out = tl.where(valid[:, None], out, 0.0)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + (hq.to(tl.int64) * stride_oh)[:, None]
              + q_rows[:, None] * stride_on + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(q_rows < n_queries)[:, None])


def _int_list(name: str, values: torch.Tensor | Sequence[int], n_heads: int) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise ModelError(f"{name} must be a 1-D integer tensor, got {values.dtype} "
                             f"{tuple(values.shape)}")
        values = values.tolist()  # reads device tensors back: pass CPU tensors to avoid a sync
    values = [int(x) for x in values]
    if len(values) != n_heads:
        raise ModelError(f"{name} has {len(values)} entries but k/v have {n_heads} KV heads")
    return values


def _head_list(name: str, values: torch.Tensor | Sequence[int], n_kv_heads: int,
               group: int) -> list[int]:
    """One value per query head, from one per KV head (shared by its group) or one per query
    head (query head ``h`` belongs to KV head ``h // group``)."""
    n_values = values.numel() if isinstance(values, torch.Tensor) else len(values)
    if n_values == n_kv_heads * group:
        return _int_list(name, values, n_values)
    return [x for x in _int_list(name, values, n_kv_heads) for _ in range(group)]


def _upload_per_sequence(name: str, value: torch.Tensor, batch: int, device: torch.device,
                         minimum: int) -> torch.Tensor:
    """A checked ``[B]`` integer tensor, as int32 on ``device``."""
    if value.dim() != 1 or value.numel() != batch or value.dtype.is_floating_point:
        raise ModelError(f"{name} must be an integer tensor of shape [{batch}], got "
                         f"{value.dtype} {tuple(value.shape)}")
    if value.device.type == "cpu" and value.numel() and int(value.min()) < minimum:
        raise ModelError(f"{name} must be >= {minimum}, got {value.tolist()}")
    return _upload(value.to(torch.int32), device)


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without waiting for the stream.  A copy from pageable memory
    synchronises, and the GPU then idles while the kernel launch is prepared: ~60 us per call
    on the H100, a quarter of a 4K window-1024 layer (benchmarks/NOTES_prefill.md, run 4).
    Pinned memory copies asynchronously; torch's host allocator keeps the buffer until the
    copy is done."""
    if host.device == device:
        return host
    if device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return not isinstance(_sparse_prefill_kernel, triton.runtime.JITFunction)


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor,
                    cfg: PrefillConfig) -> tuple[object, ...] | None:
    """TMA descriptors over K and V of ``[1, 1, block_n, D]`` tiles, then of the masked
    tiles' ``[1, 1, masked_n, D]``, or None where the pointer loads must serve: TMA off in
    ``cfg``, a GPU before Hopper, or a layout TMA cannot address (its base and every stride
    but the last, which must be 1, 16-byte aligned), or a Triton without host-side
    descriptors."""
    if not cfg.tma or k.shape[2] == 0 or TensorDescriptor is None:
        return None
    if not _interpreted() and torch.cuda.get_device_capability(k.device)[0] < 9:
        return None
    for x in (k, v):
        size = x.element_size()
        if (x.stride(-1) != 1 or x.data_ptr() % 16
                or any(st <= 0 or st * size % 16 for st in x.stride()[:-1])):
            return None
    tiles = tuple(TensorDescriptor.from_tensor(x, [1, 1, cfg.block_n, k.shape[3]])
                  for x in (k, v))
    if cfg.masked_n == cfg.block_n:  # building a descriptor costs the host a few us
        return tiles * 2
    return tiles + tuple(TensorDescriptor.from_tensor(x, [1, 1, cfg.masked_n, k.shape[3]])
                         for x in (k, v))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ModelError(f"{name} must be a 4-D tensor [batch, heads, tokens, head_dim]")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ModelError(f"q, k, v must share one dtype among float16/bfloat16/float32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ModelError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ModelError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ModelError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or "
                         f"head_dim")
    if q.shape[3] not in HEAD_DIMS:
        raise ModelError(f"head_dim {q.shape[3]} is not supported (supported: {HEAD_DIMS})")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ModelError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if q.device.type != "cuda" and not _interpreted():
        raise ModelError("the sparse_attention kernel runs on CUDA tensors (on the CPU use "
                         "backend='torch' or 'auto')")


@dataclass(frozen=True)
class _LaunchTable:
    """The int32 device views a launch reads, all from one upload: per query head ``sink``,
    ``span``, ``members`` and ``programs`` (:func:`_program_table`); per KV head the launch
    ``order`` (widest first), ``comp_slot`` (its slot in the dropped-key means, or -1), per
    slot ``comp_head`` (its KV head), and ``group_sink`` / ``group_span`` (the rule of the
    group's first query head, the compensation passes')."""

    sink: torch.Tensor
    span: torch.Tensor
    members: torch.Tensor
    programs: torch.Tensor
    order: torch.Tensor
    comp_slot: torch.Tensor
    comp_head: torch.Tensor
    group_sink: torch.Tensor
    group_span: torch.Tensor


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor | Sequence[int],
    span: torch.Tensor | Sequence[int],
    *,
    scale: float | None = None,
    q_offset: int | torch.Tensor = 0,
    seq_lens: torch.Tensor | None = None,
    compensate: torch.Tensor | Sequence[bool] | None = None,
    config: PrefillConfig | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sink + window attention for a whole layer, one launch (three with compensation
    tokens: two small passes compute the dropped keys' means first); same contract as
    :func:`reference_attention`, which runs instead where ``backend`` (``"auto"``: on CUDA
    tensors the kernel) says so.

    ``q`` is ``[B, Hq, Nq, D]``, ``k``/``v`` ``[B, Hkv, Nk, D]`` (any strides), ``sink``/``span``
    hold one value per KV head or one per query head (a plan's per-query-head spans; CPU
    tensors or lists avoid a device sync), ``q_offset`` is the
    absolute position of the first query (an int, or one per sequence), ``seq_lens`` the number
    of valid keys per sequence (right padding; default ``Nk``), ``compensate`` one flag per KV
    head for the compensation token (default none; a CPU tensor or list avoids a sync; a
    compensating head's query heads must share one sink and span).
    Returns a ``[B, Hq, Nq, D]`` tensor in ``q``'s dtype and, where ``q``'s last dimension is
    contiguous, in ``q``'s memory layout.
    """
    if not use_triton(backend, q):
        return reference_attention(q, k, v, sink, span, scale=scale, q_offset=q_offset,
                                   seq_lens=seq_lens, compensate=compensate)
    _check_inputs(q, k, v)
    batch, n_q_heads, n_queries, head_dim = q.shape
    n_kv_heads, n_keys = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not scale > 0:
        raise ModelError(f"scale must be > 0, got {scale}")
    group = n_q_heads // n_kv_heads
    sinks = _head_list("sink", sink, n_kv_heads, group)
    spans = _head_list("span", span, n_kv_heads, group)
    if min(sinks) < 0 or min(spans) < 0:
        raise ModelError(f"sink and span must be >= 0, got sink={sinks} span={spans}")
    # Valid rows sit below n_keys, so this clamp changes no rule and keeps "full" spans like
    # 2**62 inside int32; and query heads whose rules differ only beyond it can pack.
    sinks = [min(x, n_keys) for x in sinks]
    spans = [min(x, n_keys) for x in spans]
    # Heads whose rows can drop keys get a slot in the dropped-key means; the others -1.
    flags = [False] * n_kv_heads if compensate is None else [
        bool(x) for x in _int_list("compensate", torch.as_tensor(compensate).long(), n_kv_heads)]
    members = [range(h * group, (h + 1) * group) for h in range(n_kv_heads)]
    comp_heads = [h for h in range(n_kv_heads) if flags[h] and sinks[h * group] + spans[h * group]
                  < n_keys]
    for h in comp_heads:
        if len({(sinks[i], spans[i]) for i in members[h]}) > 1:
            raise ModelError(f"KV head {h} compensates but its query heads have different "
                             "sinks or spans; the compensation token needs one rule per group")
    comp_slot = [-1] * n_kv_heads
    for slot, h in enumerate(comp_heads):
        comp_slot[h] = slot
    # Heavy heads first: the program's work grows with sink + span.
    reaches = [sinks[i] + spans[i] for i in range(n_q_heads)]
    order = sorted(range(n_kv_heads), key=lambda h: -max(reaches[i] for i in members[h]))
    comp_head = comp_heads + [0] * (n_kv_heads - len(comp_heads))  # slot -> KV head
    reach = min(max(reaches), n_keys)
    cfg = config or default_config(head_dim, reach,
                                   shared_rule_heads(sinks, spans, group, n_keys))
    packs = pack_heads(sinks, spans, group, cfg)
    program_members, programs = _program_table(packs, group)
    # One upload: per query head sink, span, pack members and programs, then per KV head the
    # order, the compensation slots and the sink and span of its group's first query head
    # (the compensation passes').
    per_q = [sinks, spans, program_members, programs]
    per_kv = [order, comp_slot, comp_head, sinks[::group], spans[::group]]
    flat = _upload(torch.tensor(sum(per_q + per_kv, []), dtype=torch.int32), q.device)
    table = _LaunchTable(*flat[:len(per_q) * n_q_heads].view(len(per_q), n_q_heads),
                         *flat[len(per_q) * n_q_heads:].view(len(per_kv), n_kv_heads))

    if isinstance(q_offset, torch.Tensor):
        qoff = _upload_per_sequence("q_offset", q_offset, batch, q.device, 0)
        q_offset_scalar = 0
    else:
        if int(q_offset) < 0:
            raise ModelError(f"q_offset must be >= 0, got {q_offset}")
        qoff, q_offset_scalar = None, int(q_offset)
    lens = (None if seq_lens is None
            else _upload_per_sequence("seq_lens", seq_lens, batch, q.device, 0))

    # In q's memory layout, as SDPA does: transformers' [B, N, H, D] seen through a transpose
    # stays so, and the attention layer's transpose back to it costs no copy.
    out = torch.empty_like(q)
    if out.stride(-1) != 1:
        out = torch.empty((batch, n_q_heads, n_queries, head_dim), dtype=q.dtype,
                          device=q.device)
    if out.numel() == 0:
        return out
    if comp_heads:
        means = _dropped_means(q, k, v, table, comp_heads, qoff, q_offset_scalar)
    else:
        means = (flat, flat)  # never read
    grid = (batch * n_q_heads, triton.cdiv(n_queries, cfg.block_m))
    if cfg.head_major:
        grid = (grid[0] * grid[1],)
    descriptors = _kv_descriptors(k, v, cfg)
    _sparse_prefill_kernel[grid](
        q, k, v, out, *(descriptors or (0, 0, 0, 0)), table.sink, table.span, table.order,
        table.members, table.programs, qoff if qoff is not None else flat,
        lens if lens is not None else flat, table.comp_slot, *means,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        q_offset_scalar, n_queries, n_keys, len(comp_heads), scale * LOG2E,
        HQ=n_q_heads, GROUP=group, PACK=_uniform_pack(packs), HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, EDGE_N=cfg.masked_n,
        HAS_QOFF=qoff is not None, HAS_SEQLENS=lens is not None, HAS_COMP=bool(comp_heads),
        HEAD_MAJOR=cfg.head_major, TMA=descriptors is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _dropped_means(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: _LaunchTable,
                   comp_heads: list[int], qoff: torch.Tensor | None,
                   q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the mean key and value of the keys it drops, for the compensating
    heads: two ``[B, n_comp, Nq, D]`` tensors in ``q``'s dtype.  Two passes of parallel
    programs (block sums, then means), no serial walk over the sequence."""
    batch, _, n_queries, head_dim = q.shape
    slots = batch * len(comp_heads)
    mean_k, mean_v = (torch.empty((batch, len(comp_heads), n_queries, head_dim), dtype=q.dtype,
                                  device=q.device) for _ in range(2))
    block_t, block_d = _MEANS_BLOCK_T, min(64, head_dim)
    grid = (triton.cdiv(n_queries, block_t), slots, head_dim // block_d)
    sums = torch.empty((slots, grid[0] + 1, 2, head_dim), dtype=torch.float32, device=q.device)
    common = dict(HAS_QOFF=qoff is not None, HEAD_DIM=head_dim, BLOCK_T=block_t,
                  BLOCK_D=block_d, num_warps=8)
    heads = (table.group_sink, table.group_span, table.comp_head,
             qoff if qoff is not None else table.group_sink)
    _dropped_sums_kernel[grid](k, v, sums, *heads, *k.stride(), *v.stride(), q_offset,
                               k.shape[2], len(comp_heads), **common)
    _dropped_means_kernel[grid](k, v, sums, mean_k, mean_v, *heads, *k.stride(), *v.stride(),
                                q_offset, n_queries, k.shape[2], len(comp_heads),
                                BLOCK_S=64, **common)
    return mean_k, mean_v


def _as_per_sequence(value: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
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
    offsets = _as_per_sequence(q_offset, batch, device)
    lens = _as_per_sequence(nk if seq_lens is None else seq_lens, batch, device)
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
