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

from collections.abc import Sequence

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
    heads, nblk, _ = far.shape
    num_sink = sink.shape[1]
    far_tail = _tails(far.astype(np.float64))  # [H, nblk+1]
    sink_tail = _tails(sink.astype(np.float64))  # [H, K, nblk+1]
    # kept_by_sink[:, k, m]: influence of the entries of key blocks < k that the window drops.
    kept_by_sink = np.concatenate(
        [np.zeros((heads, 1, nblk + 1)), np.cumsum(sink_tail, 1)], 1)  # [H, K+1, nblk+1]

    spans = rule_spans(rules, length).astype(np.int64)
    sinks = rule_sinks(rules, length).astype(np.int64)
    full = np.array([r.full for r in rules], dtype=bool) | (spans >= length) | (sinks >= length)
    bad = (~full) & ((sinks % block != 0) | (sinks // block > num_sink))
    if bad.any():
        rule = rules[int(np.flatnonzero(bad)[0])]
        raise ProfileError(f"rule {rule.describe()!r} has a sink that this profile cannot price "
                           f"(sinks must be multiples of the block {block} and at most "
                           f"{num_sink * block}); profile again with a rule space that has it")
    k = np.where(full, 0, sinks // block)
    m0 = np.minimum(spans // block, nblk)
    m1 = np.minimum(m0 + 1, nblk)
    frac = (spans - m0 * block) / block

    def at(m: np.ndarray) -> np.ndarray:
        return far_tail[:, m] - kept_by_sink[:, k, m]

    cost = (1 - frac) * at(m0) + frac * at(m1)
    return np.where(full, 0.0, np.maximum(cost, 0.0))
