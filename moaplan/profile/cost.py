"""Dropped influence of rules, computed from the blockwise summary of one length.

A rule with sink ``s = k * b`` and span ``w = m * b`` drops the entries with ``j >= s`` and
``i - j >= w``.  An entry at block distance ``delta`` has ``i - j = delta * b + (i mod b) -
(j mod b)``, so it is dropped by the window iff ``delta > m``, or ``delta == m`` and it is in
part 0.  Hence, with ``tail(x)[m] = sum_{delta > m} x[delta, :].sum() + x[m, 0]``::

    dropped(k, m) = tail(far)[m] - sum_{k' < k} tail(sink[k'])[m]

exactly.  A span between two block multiples is interpolated linearly between them (exact at
block granularity); a span ``>= N`` (or a sink ``>= N``, or a full rule) drops nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from moaplan.errors import ProfileError
from moaplan.rules import Rule, rule_sinks, rule_spans


def _tails(x: np.ndarray) -> np.ndarray:
    """``tail(x)`` along axis -2 of ``x [..., nblk, 2]``, zero appended: ``[..., nblk + 1]``."""
    totals = x.sum(-1)
    after = np.cumsum(totals[..., ::-1], -1)[..., ::-1] - totals  # sum over delta > m
    tail = after + x[..., 0]
    return np.concatenate([tail, np.zeros(tail.shape[:-1] + (1,))], -1)


def dropped_influence(far: np.ndarray, sink: np.ndarray, rules: Sequence[Rule], length: int,
                      block: int) -> np.ndarray:
    """``(heads, len(rules))`` dropped influence, from ``far [heads, nblk, 2]`` and
    ``sink [heads, K, nblk, 2]`` of one length."""
    spans = rule_spans(rules, length).astype(np.int64)
    sinks = rule_sinks(rules, length).astype(np.int64)
    full = np.array([r.full for r in rules], dtype=bool)
    return dropped_at(far, sink, spans[None, :], sinks[None, :], length, block,
                      full=full[None, :], name=lambda c: f"rule {rules[c].describe()!r}")


def dropped_at(far: np.ndarray, sink: np.ndarray, spans: np.ndarray, sinks: np.ndarray,
               length: int, block: int, *, full: np.ndarray | bool = False,
               name: Callable[[int], str] = lambda c: f"window {c}") -> np.ndarray:
    """``(heads, C)`` dropped influence of ``C`` windows per head given as token counts:
    ``spans`` and ``sinks`` broadcast to ``(heads, C)`` (one row for every head, or a row per
    head, e.g. query heads' spans capped at their KV head's), ``full`` where nothing drops.
    ``far [heads, nblk, 2]`` and ``sink [heads, K, nblk, 2]`` are the summaries of one length.
    Every sink of a window that drops anything must be a whole number of sink blocks; else a
    :class:`ProfileError` names the first such window by ``name(column)``."""
    heads, nblk, _ = far.shape
    num_sink = sink.shape[1]
    spans, sinks = np.broadcast_arrays(np.asarray(spans, dtype=np.int64),
                                       np.asarray(sinks, dtype=np.int64))
    spans, sinks = (np.broadcast_to(x, (heads, x.shape[-1])) for x in (spans, sinks))
    full = np.broadcast_to(full, spans.shape) | (spans >= length) | (sinks >= length)
    bad = ~full & ((sinks % block != 0) | (sinks // block > num_sink))
    if bad.any():
        raise ProfileError(f"{name(int(np.flatnonzero(bad.any(axis=0))[0]))} has a sink that "
                           f"this profile cannot price (sinks must be multiples of the block "
                           f"{block} and at most {num_sink * block}); profile again with a "
                           "rule space that has it")
    far_tail = _tails(far.astype(np.float64))  # [H, nblk+1]
    sink_tail = _tails(sink.astype(np.float64))  # [H, K, nblk+1]
    # kept_by_sink[:, k, m]: influence of the entries of key blocks < k that the window drops.
    kept_by_sink = np.concatenate(
        [np.zeros((heads, 1, nblk + 1)), np.cumsum(sink_tail, 1)], 1)  # [H, K+1, nblk+1]

    k = np.where(full, 0, sinks // block)
    m0 = np.minimum(spans // block, nblk)
    m1 = np.minimum(m0 + 1, nblk)
    frac = (spans - m0 * block) / block
    head = np.arange(heads)[:, None]

    def at(m: np.ndarray) -> np.ndarray:
        return far_tail[head, m] - kept_by_sink[head, k, m]

    cost = (1 - frac) * at(m0) + frac * at(m1)
    return np.where(full, 0.0, np.maximum(cost, 0.0))
