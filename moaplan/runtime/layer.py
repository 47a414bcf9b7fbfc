"""One layer's attention under its rules, on a whole chunk of keys: the compute seam that
``moaplan.apply``'s attention function and the first prefill of a ``MoaplanCache`` share.
On CUDA the block-sparse Triton kernel (:mod:`moaplan.kernels.prefill`) or, for the heads
where it is faster, SDPA (:mod:`moaplan.runtime.routing`); elsewhere a windowed torch
attention (:mod:`moaplan.runtime.windowed`) or the torch reference (the kernels' oracle), or
SDPA likewise.  Padding (left or right) is handled by moving each sequence's real tokens to
the front, so real-token positions become slot indices."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moaplan.kernels.common import use_triton
from moaplan.kernels.layout import RuleTable
from moaplan.kernels.prefill import HEAD_DIMS, reference_attention
from moaplan.rules import Rule
from moaplan.runtime.routing import routed_attention
from moaplan.runtime.windowed import windowed_attention


@dataclass(frozen=True)
class NativeAttention:
    """What a model's own attention call asks for beyond the plan's rules: a local layer's
    sliding ``window`` (intersected with every rule) and Gemma 2's logit ``softcap``."""

    window: int | None = None
    softcap: float | None = None

    def kernel_ready(self, q: torch.Tensor) -> bool:
        """Whether the Triton kernels can run this call: on CUDA, with a head_dim they are
        built for and nothing they do not implement; otherwise the torch path runs, and on a
        GPU a warning says so (it is much slower there)."""
        if not use_triton("auto", q):
            return False
        missing = [what for what, absent in (
            (f"head_dim {q.shape[-1]}", q.shape[-1] in HEAD_DIMS),
            ("a native sliding window", self.window is None),
            ("logit soft-capping", self.softcap is None)) if not absent]
        if missing:
            warnings.warn(f"moaplan's Triton kernels do not implement {' or '.join(missing)}; "
                          "using the torch attention (correct, slower)", stacklevel=3)
        return not missing


PLAIN = NativeAttention()  # a model that asks nothing beyond the rules


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: RuleTable, n: int,
    *, scale: float | None, q_offset: int | torch.Tensor, seq_lens: torch.Tensor | None,
    native: NativeAttention,
) -> torch.Tensor:
    """The compute seam: sequences with real tokens at key slots ``0 .. seq_lens-1``
    (right-padded), all at rule length ``n``.  When the model asks nothing beyond the rules
    (``native`` is :data:`PLAIN`): on CUDA the block-sparse Triton kernel, or SDPA for the
    heads where it is faster (:func:`moaplan.runtime.routing.routed_attention`); elsewhere the
    windowed torch attention where it applies (no padding, no compensation token), else the
    torch reference (which is also the kernel's oracle), or SDPA likewise.  For what the
    kernels do not implement (a native window, soft-capping, another head_dim; warned on
    CUDA) the windowed torch attention where it applies (nothing asked beyond the rules,
    no padding, no compensation token), else the torch reference with ``window`` and
    ``softcap``."""
    heads = table.at(n, q.shape[1] // k.shape[1])
    if native.kernel_ready(q) or (native == PLAIN and not use_triton("auto", q)):
        return routed_attention(q, k, v, heads.sink, heads.span, scale=scale,
                                q_offset=q_offset, seq_lens=seq_lens,
                                compensate=heads.compensate)
    if (native == PLAIN and seq_lens is None and isinstance(q_offset, int)
            and not heads.compensate.any()):
        return windowed_attention(q, k, v, heads.sink, heads.span, scale=scale,
                                  q_offset=q_offset)
    return reference_attention(q, k, v, heads.sink, heads.span, scale=scale, q_offset=q_offset,
                               seq_lens=seq_lens, compensate=heads.compensate,
                               window=native.window, softcap=native.softcap)


def _gather_slots(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, :, order[b, t]]`` for ``x`` of shape ``[B, H, N, D]`` and ``order`` ``[B, N]``."""
    index = order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return x.gather(2, index)


def layer_attention(
    rules: RuleTable | Sequence[Rule], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mask: torch.Tensor | None, *, scale: float | None = None,
    native: NativeAttention = PLAIN,
) -> torch.Tensor:
    """Attention of one layer under its rules (one per KV head, compensation tokens
    included): ``[B, Hq, Nq, D]``.

    ``mask`` is ``moaplan.runtime.apply.real_token_mask``'s: None (no padding, queries in the
    last slots: one call at ``N = Nk``), or bool ``[B, 1, Nq, Nk]`` whose padding rows and
    columns are all False (see :func:`real_token_attention`).  ``rules``: the layer's rules,
    one per KV head, or their :class:`~moaplan.kernels.layout.RuleTable`.
    """
    rules = rules if isinstance(rules, RuleTable) else RuleTable.of(rules)
    nq, nk = q.shape[2], k.shape[2]
    if 1 < nq and (mask is None and nq < nk or mask is not None and _continues(mask)):
        # A chunk after cached tokens: each query at its own length, as if decoded one by one.
        return torch.cat([layer_attention(
            rules, q[:, :, t:t + 1], k[:, :, :nk - nq + t + 1], v[:, :, :nk - nq + t + 1],
            None if mask is None else mask[:, :, t:t + 1, :nk - nq + t + 1], scale=scale,
            native=native) for t in range(nq)], dim=2)
    if mask is None:
        return _attend(q, k, v, rules, nk, scale=scale, q_offset=nk - nq, seq_lens=None,
                       native=native)
    # A real query sees itself, so its row has a True; a real key is seen by its own query.
    return real_token_attention(rules, q, k, v, mask[:, 0].any(1), mask[:, 0].any(2),
                                scale=scale, native=native)


def _continues(mask: torch.Tensor) -> bool:
    """Whether a padded chunk's queries come after real tokens already cached (one host sync):
    some sequence has more real keys than real queries."""
    rows = mask[:, 0]
    return bool((rows.any(1).sum(1) > rows.any(2).sum(1)).any())


def real_token_attention(
    table: RuleTable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_real: torch.Tensor, q_real: torch.Tensor, *, scale: float | None = None,
    native: NativeAttention = PLAIN,
) -> torch.Tensor:
    """:func:`layer_attention` with padding: ``key_real`` ``[B, Nk]`` and ``q_real``
    ``[B, Nq]`` mark the real tokens.  Each sequence's real tokens are moved to the front (a
    stable sort keeps their order), so real-token positions become slot indices; sequences
    are grouped by their real length ``N`` (the rule length), and the outputs are moved back
    to their query slots (padding rows stay zero)."""
    key_order = torch.argsort((~key_real).to(torch.int8), dim=1, stable=True)
    q_order = torch.argsort((~q_real).to(torch.int8), dim=1, stable=True)
    seq_lens = key_real.sum(1)
    # Every real key is a real query or precedes them all: the real queries are the last
    # real tokens of their sequence, at consecutive positions.
    q_offset = seq_lens - q_real.sum(1)
    q_c = _gather_slots(q, q_order)
    k_c, v_c = _gather_slots(k, key_order), _gather_slots(v, key_order)

    out_c = q.new_zeros(q.shape[:3] + (v.shape[3],))
    for n in seq_lens.unique().tolist():
        if n == 0:
            continue  # no real token yet: nothing to attend, the rows stay zero
        rows = (seq_lens == n).nonzero().squeeze(1)
        out_c[rows] = _attend(q_c[rows], k_c[rows], v_c[rows], table, n, scale=scale,
                              q_offset=q_offset[rows], seq_lens=seq_lens[rows], native=native)
    # q_order is a permutation of the query slots: scatter undoes the gather.
    index = q_order[:, None, :, None].expand(-1, out_c.shape[1], -1, out_c.shape[3])
    return torch.zeros_like(out_c).scatter(2, index, out_c)
