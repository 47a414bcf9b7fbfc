"""Sparse attention rules: sink tokens plus an elastic sliding window, and their densities.

One convention, used everywhere in moaplan: at input length ``N`` a rule keeps
``sink`` leading tokens and a window of ``span(N)`` keys, and query ``i`` sees key ``j``
iff ``j <= i and (j < sink or i - j < span)``.  A span of ``W`` therefore means ``W`` keys
(the query's own position included), not ``W + 1``.

All densities are closed-form and vectorised over rules (heads) and lengths with numpy
broadcasting; nothing here ever builds an ``N x N`` mask.

Compensation (RazorAttention): a non-full rule with ``compensate`` also gives every query that
drops keys one extra entry, whose key and value are the means of the dropped keys and values and
whose softmax weight is multiplied by their count.  The densities count that entry as one more
key wherever something is dropped; a full rule ignores ``compensate``.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moaplan.errors import RuleError

ArrayLike = int | float | Sequence[int] | np.ndarray

# The largest length, sink or span a rule may name, and the largest beta.  Spans are computed
# in int64 as ``alpha + beta * N`` (below 2**52 with these bounds) and attention densities
# count ``N (N + 1) / 2`` entries (below 2**62), so no plan or length can overflow into a
# wrong span or density.
MAX_TOKENS = 2**31
MAX_BETA = 2.0**20
# What a density counts: the keys a head's cache holds ("kv") or the query-key pairs its
# prefill computes ("attention").  A budget limits one of them.
DENSITY_KINDS = ("kv", "attention")


def is_density(value: float) -> bool:
    """Whether ``value`` can be a density (a budget): in (0, 1]."""
    return 0 < value <= 1


def _check_number(name: str, value: object, low: float, high: float, *,
                  integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise RuleError(f"{name} must be {'a whole' if integer else 'a finite'} number, "
                        f"got {value!r}")
    if not low <= value <= high:
        raise RuleError(f"{name} must be in [{low:.15g}, {high:.15g}], got {value!r}")


@dataclass(frozen=True)
class Rule:
    """A per-KV-head attention rule.

    ``span(N) = clamp(round(alpha + beta * N), min_span, min(max_span, N))``; a ``full`` rule
    sees every causal key.  ``compensate`` adds RazorAttention's compensation token (one extra
    entry carrying the mean of the dropped keys and values).

    ``query_windows`` (optional) narrows the prefill of each query head of the KV head's GQA
    group: one ``(alpha, beta)`` per query head, whose span is computed like the rule's (but
    from a floor of one key: the rule's ``min_span``, which may widen the rule to cover the
    group's other members, is not the query head's own) and capped at the rule's span (so the
    cache, which holds the rule's span, still has every key a query head needs); every query
    head keeps the rule's sinks.  Without it every query head uses the
    rule's span.  Only the prefill narrows: decode steps read the rule's whole span for every
    query head (the decode kernel works per KV head), so a generated token may see more than
    its query head's window.
    """

    sink: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    min_span: int = 1
    max_span: int | None = None
    full: bool = False
    compensate: bool = False
    query_windows: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.query_windows is not None:
            if self.full or self.compensate:
                raise RuleError("query_windows need a windowed rule without compensation (a "
                                "full rule's query heads see every key; the compensation "
                                "token needs one window per group)")
            if not self.query_windows or any(len(w) != 2 for w in self.query_windows):
                raise RuleError(f"query_windows must be (alpha, beta) pairs, one per query "
                                f"head, got {self.query_windows}")
            for i, (alpha, beta) in enumerate(self.query_windows):
                _check_number(f"query_windows[{i}] alpha", alpha, -MAX_TOKENS, MAX_TOKENS)
                _check_number(f"query_windows[{i}] beta", beta, 0, MAX_BETA)
        if self.full:
            return
        _check_number("sink", self.sink, 0, MAX_TOKENS, integer=True)
        _check_number("alpha", self.alpha, -MAX_TOKENS, MAX_TOKENS)
        _check_number("beta", self.beta, 0, MAX_BETA)
        _check_number("min_span", self.min_span, 1, MAX_TOKENS, integer=True)
        if self.max_span is not None:
            _check_number("max_span", self.max_span, 1, MAX_TOKENS, integer=True)
            if self.max_span < self.min_span:
                raise RuleError(f"max_span ({self.max_span}) is smaller than min_span "
                                f"({self.min_span})")

    @classmethod
    def full_attention(cls) -> Rule:
        return cls(full=True)

    @classmethod
    def window(cls, span: int, sink: int = 0) -> Rule:
        """A fixed window of ``span`` keys plus ``sink`` sink tokens (StreamingLLM)."""
        return cls(sink=sink, alpha=float(span), beta=0.0)

    def span(self, n: ArrayLike) -> np.ndarray:
        """Window size in keys at length(s) ``n`` (an int64 array shaped like ``n``)."""
        return rule_spans([self], n)[0]

    def describe(self) -> str:
        """Short text such as ``64 sinks + 0.5N-64`` or ``full``."""
        if self.full:
            return "full"
        if self.beta and self.alpha:
            window = f"{self.beta:g}N{self.alpha:+g}"
        else:
            window = f"{self.beta:g}N" if self.beta else f"{self.alpha:g}"
        text = f"{self.sink} sinks + {window}" if self.sink else window
        if self.max_span is not None:
            text += f" (<= {self.max_span})"
        if self.query_windows is not None:
            text += f" [{len(self.query_windows)} query windows]"
        return text + (" +comp" if self.compensate else "")


def rule_arrays(rules: Sequence[Rule]) -> dict[str, np.ndarray]:
    """Column arrays of a list of rules, shaped ``(len(rules), 1)`` to broadcast against lengths."""
    big = np.iinfo(np.int64).max // 4
    cols = {
        "full": np.array([r.full for r in rules], dtype=bool),
        "sink": np.array([0 if r.full else r.sink for r in rules], dtype=np.int64),
        "alpha": np.array([r.alpha for r in rules], dtype=np.float64),
        "beta": np.array([r.beta for r in rules], dtype=np.float64),
        "min_span": np.array([r.min_span for r in rules], dtype=np.int64),
        "max_span": np.array(
            [big if r.max_span is None else r.max_span for r in rules], dtype=np.int64
        ),
        "compensate": np.array([r.compensate and not r.full for r in rules], dtype=bool),
    }
    return {k: v[:, None] for k, v in cols.items()}


def rule_spans(rules: Sequence[Rule], n: ArrayLike) -> np.ndarray:
    """Spans of every rule at every length: int64 array ``(len(rules), *shape(n))``."""
    n = np.asarray(n, dtype=np.int64)
    c = rule_arrays(rules)
    span = span_formula(n.reshape(1, -1), c["full"], c["alpha"], c["beta"], c["min_span"],
                        c["max_span"])
    return span.reshape((len(rules),) + n.shape)


def span_formula(n: Any, full: Any, alpha: Any, beta: Any, min_span: Any, max_span: Any,
                 xp: Any = np) -> Any:
    """The span formula, the one host/torch copy of it (the decode write's Triton copy is
    ``moaplan.kernels.layout.rule_span``): ``n`` where ``full``, else
    ``clamp(floor(alpha + beta n + 1/2), min_span, min(max_span, n))`` in float64 then int64,
    on numpy arrays (``xp=np``) or torch tensors (``xp=torch``) that broadcast together."""
    # Half up, not Python's banker's round(): plans must give the same span on every machine.
    raw = xp.asarray(xp.floor(alpha + beta * n + 0.5), dtype=xp.int64)
    return xp.where(full, n, xp.minimum(xp.maximum(raw, min_span), xp.minimum(max_span, n)))


def visible(sink: Any, span: Any, q_pos: Any, k_pos: Any) -> Any:
    """Which (query position, key position) pairs a head sees, on numpy arrays or torch
    tensors that broadcast together: the one convention, query ``i`` sees key ``j`` iff
    ``j <= i and (j < sink or i - j < span)``."""
    return (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < span))


def query_spans(rules: Sequence[Rule], n: ArrayLike, group: int) -> np.ndarray:
    """Prefill span of every query head at every length: int64 ``(len(rules) * group,
    *shape(n))``, query head ``r * group + g`` belonging to rule ``r``.  A rule's
    ``query_windows`` give its heads' spans (from one key, not the rule's ``min_span``; each
    capped at the rule's span); a rule without them gives every head its own span."""
    n = np.asarray(n, dtype=np.int64)
    spans = np.repeat(rule_spans(rules, n), group, axis=0)
    for r, rule in enumerate(rules):
        if rule.query_windows is None:
            continue
        if len(rule.query_windows) != group:
            raise ValueError(f"rule {r} has {len(rule.query_windows)} query windows for a "
                             f"group of {group} query heads")
        alpha, beta = np.array(rule.query_windows, dtype=np.float64).T
        heads = [replace(rule, alpha=float(a), beta=float(b), min_span=1, query_windows=None)
                 for a, b in zip(alpha, beta)]
        rows = slice(r * group, (r + 1) * group)
        spans[rows] = np.minimum(rule_spans(heads, n), spans[rows])
    return spans


def rule_sinks(rules: Sequence[Rule], n: ArrayLike) -> np.ndarray:
    """Effective sink sizes (``min(sink, N)``), shaped like :func:`rule_spans`."""
    n = np.asarray(n, dtype=np.int64)
    sink = rule_arrays(rules)["sink"]
    return np.minimum(sink, n.reshape(1, -1)).reshape((len(rules),) + n.shape)


def cache_slots(rules: Sequence[Rule], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Sink slots and ring slots of every rule in a cache sized for ``length`` tokens: the
    sinks, and a ring of the span at ``length`` but no longer than the tokens after the sinks
    (``sink + span`` can exceed a short length), at least one slot.  So a head never holds
    more than ``length`` slots, as :func:`kv_density` counts."""
    sinks = rule_sinks(rules, length)
    rings = np.maximum(np.minimum(rule_spans(rules, length), length - sinks), 1)
    return sinks, rings


def kv_density(sink: ArrayLike, span: ArrayLike, n: ArrayLike,
               compensate: ArrayLike = False) -> np.ndarray:
    """Share of the ``N`` keys a head's cache must hold after a length-``N`` input.

    A compensating head (``compensate`` true) that drops keys (``sink + span < N``) holds one
    more: the sums of its evicted keys and values stand for one extra key."""
    n = np.asarray(n, dtype=np.int64)
    c = np.asarray(sink) + np.asarray(span)
    return (np.minimum(n, c) + (np.asarray(compensate) & (c < n))) / n


def attention_density(sink: ArrayLike, span: ArrayLike, n: ArrayLike,
                      compensate: ArrayLike = False) -> np.ndarray:
    """Computed causal entries over ``N(N+1)/2`` for a length-``N`` prefill.

    Row ``i`` keeps ``min(i+1, c)`` keys with ``c = sink + span``, so the total is
    ``sum_{k=1..N} min(k, c) = c(c+1)/2 + (N - c)c`` when ``c < N``.  With ``compensate``
    each of the ``N - c`` rows that drop keys computes one extra entry.
    """
    n = np.asarray(n, dtype=np.int64)
    c = np.minimum(np.asarray(sink, dtype=np.int64) + np.asarray(span, dtype=np.int64), n)
    kept = c * (c + 1) // 2 + (n - c) * c + np.asarray(compensate) * (n - c)
    return kept / (n * (n + 1) / 2)


def block_attention_density(
    sink: ArrayLike, span: ArrayLike, n: int, block_m: int, block_n: int | None = None,
    edge_n: int | None = None,
) -> np.ndarray:
    """Share of the causal ``block_m x block_n`` tiles a kernel must visit at length ``n``.

    Vectorised over rules (``sink``/``span`` arrays of any matching shape) and over query
    blocks (``O(n / block_m)`` work per rule).  A tile is visited when it holds at least one
    visible entry; the denominator counts the tiles a dense causal kernel visits.  A kernel
    whose masked tiles (sinks, window edges, diagonal) are ``edge_n`` keys wide visits the
    keys of every ``block_m x edge_n`` tile with a visible entry: that count of keys, in
    ``block_n`` tiles.
    """
    block_n = block_n or block_m
    edge_n = edge_n or block_n
    sink = np.asarray(sink, dtype=np.int64)[..., None]
    span = np.asarray(span, dtype=np.int64)[..., None]
    q_lo = np.arange(0, n, block_m, dtype=np.int64)
    q_hi = np.minimum(q_lo + block_m, n) - 1  # last query row of each block
    last_kb = q_hi // edge_n  # diagonal key block (inclusive)
    win_first_key = np.maximum(q_lo - span + 1, 0)  # first row's window start
    win_first_kb = win_first_key // edge_n
    sink_keys = np.minimum(sink, q_hi + 1)  # sink keys visible to the block's last row
    sink_blocks = -(-sink_keys // edge_n)  # ceil
    window_blocks = last_kb - win_first_kb + 1
    overlap = np.maximum(sink_blocks - win_first_kb, 0)
    visited = np.minimum(sink_blocks + window_blocks - overlap, last_kb + 1)
    return visited.sum(-1) * edge_n / block_n / (q_hi // block_n + 1).sum()


@dataclass(frozen=True)
class RuleSpace:
    """The grid of candidate rules the optimizer chooses from; ``full`` is always included.

    A candidate is ``(sink, alpha, beta)`` for every combination of the grids (``alpha ==
    beta == 0`` is left out).  With ``compensate`` every such candidate also comes with
    RazorAttention's compensation token, right after it.

    A profile cannot price the compensation token (its first-order influence is that of the
    dropped entries, whatever replaces them), so a compensating rule's cost is its plain twin's
    times ``compensate_factor`` (:meth:`cost_factors`): a prior that lets the optimizer pick it
    where one extra key of density is worth it; the search's measured validation loss then
    judges the plans.  Equality (which decides whether a stored profile can be reused) ignores
    both options: the profile's summaries do not depend on them.
    """

    sinks: tuple[int, ...] = (64,)
    alphas: tuple[float, ...] = (0, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
    betas: tuple[float, ...] = tuple(k / 16 for k in range(16))
    min_span: int = 16
    compensate: bool = field(default=False, compare=False)
    compensate_factor: float = field(default=0.75, compare=False)
    rules: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.sinks or not self.alphas or not self.betas:
            raise ValueError("a rule space needs at least one sink, alpha and beta value")
        if not 0 <= self.compensate_factor <= 1:
            raise ValueError(f"compensate_factor must be in [0, 1], got {self.compensate_factor}")
        candidates: list[Rule] = [Rule.full_attention()]
        for sink, alpha, beta in itertools.product(self.sinks, self.alphas, self.betas):
            if alpha == 0 and beta == 0:
                continue
            rule = Rule(sink=int(sink), alpha=float(alpha), beta=float(beta),
                        min_span=self.min_span)
            candidates.append(rule)
            if self.compensate:
                candidates.append(replace(rule, compensate=True))
        object.__setattr__(self, "rules", tuple(candidates))

    def __len__(self) -> int:
        return len(self.rules)

    def spans(self, lengths: ArrayLike) -> np.ndarray:
        return rule_spans(self.rules, lengths)

    def density(self, lengths: ArrayLike, kind: str = "kv") -> np.ndarray:
        """``(len(space), len(lengths))`` densities of ``kind`` (:func:`density`)."""
        return density(self.rules, lengths, kind)

    def cost_factors(self) -> np.ndarray:
        """``(len(space),)`` multipliers of the profiled dropped influence: ``compensate_factor``
        for compensating rules, 1 for the others."""
        return np.where(rule_arrays(self.rules)["compensate"][:, 0], self.compensate_factor, 1.0)

    def to_dict(self) -> dict:
        return {"sinks": list(self.sinks), "alphas": list(self.alphas),
                "betas": list(self.betas), "min_span": self.min_span,
                "compensate": self.compensate, "compensate_factor": self.compensate_factor}

    @classmethod
    def from_dict(cls, data: dict) -> RuleSpace:
        return cls(sinks=tuple(int(s) for s in data["sinks"]),
                   alphas=tuple(float(a) for a in data["alphas"]),
                   betas=tuple(float(b) for b in data["betas"]),
                   min_span=int(data.get("min_span", 16)),
                   compensate=bool(data.get("compensate", False)),
                   compensate_factor=float(data.get("compensate_factor",
                                                    RuleSpace.compensate_factor)))


def density(rules: Iterable[Rule], n: ArrayLike, kind: str = "kv") -> np.ndarray:
    """Per-rule density of ``kind`` (``"kv"`` or ``"attention"``) at length(s) ``n``, the
    compensation token included (one extra key where a compensating rule drops keys); a rule's
    attention density is its query heads' mean (their ``query_windows``, if any)."""
    rules = list(rules)
    sinks, spans = rule_sinks(rules, n), rule_spans(rules, n)
    compensate = rule_arrays(rules)["compensate"].reshape((len(rules),) + (1,) * np.ndim(n))
    if kind == "kv":
        return kv_density(sinks, spans, n, compensate)
    if kind == "attention":
        dens = attention_density(sinks, spans, n, compensate)
        for r, rule in enumerate(rules):  # a rule's query heads, averaged
            if rule.query_windows is not None:
                group = len(rule.query_windows)
                dens[r] = attention_density(sinks[r], query_spans([rule], n, group), n).mean(0)
        return dens
    raise ValueError(f"unknown density kind {kind!r}; use one of {', '.join(DENSITY_KINDS)}")
