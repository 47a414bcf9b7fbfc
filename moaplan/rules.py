"""Sparse attention rules: sink tokens plus an elastic sliding window, and their densities.

One convention, used everywhere in moaplan: at input length ``N`` a rule keeps
``sink`` leading tokens and a window of ``span(N)`` keys, and query ``i`` sees key ``j``
iff ``j <= i and (j < sink or i - j < span)``.  A span of ``W`` therefore means ``W`` keys
(the query's own position included), not ``W + 1``.

All densities are closed-form and vectorised over rules (heads) and lengths with numpy
broadcasting; nothing here ever builds an ``N x N`` mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

ArrayLike = int | float | Sequence[int] | np.ndarray


@dataclass(frozen=True)
class Rule:
    """A per-KV-head attention rule.

    ``span(N) = clamp(round(alpha + beta * N), min_span, min(max_span, N))``; a ``full`` rule
    sees every causal key.  ``compensate`` adds RazorAttention's compensation token (one extra
    entry carrying the mean of the dropped keys and values).
    """

    sink: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    min_span: int = 1
    max_span: int | None = None
    full: bool = False
    compensate: bool = False

    def __post_init__(self) -> None:
        if self.full:
            return
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.min_span < 1:
            raise ValueError(f"min_span must be >= 1, got {self.min_span}")
        if self.max_span is not None and self.max_span < self.min_span:
            raise ValueError(f"max_span ({self.max_span}) must be >= min_span ({self.min_span})")

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
        return text + (" +comp" if self.compensate else "")


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # Python's round() is banker's rounding; plans must give the same span on every machine.
    return np.floor(x + 0.5).astype(np.int64)


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
    }
    return {k: v[:, None] for k, v in cols.items()}


def rule_spans(rules: Sequence[Rule], n: ArrayLike) -> np.ndarray:
    """Spans of every rule at every length: int64 array ``(len(rules), *shape(n))``."""
    n = np.asarray(n, dtype=np.int64)
    flat = n.reshape(1, -1)
    c = rule_arrays(rules)
    raw = _round_half_up(c["alpha"] + c["beta"] * flat)
    span = np.minimum(np.maximum(raw, c["min_span"]), np.minimum(c["max_span"], flat))
    span = np.where(c["full"], flat, span)
    return span.reshape((len(rules),) + n.shape)


def rule_sinks(rules: Sequence[Rule], n: ArrayLike) -> np.ndarray:
    """Effective sink sizes (``min(sink, N)``), shaped like :func:`rule_spans`."""
    n = np.asarray(n, dtype=np.int64)
    sink = rule_arrays(rules)["sink"]
    return np.minimum(sink, n.reshape(1, -1)).reshape((len(rules),) + n.shape)


def kept_per_row(sink: ArrayLike, span: ArrayLike, i: ArrayLike) -> np.ndarray:
    """Keys query ``i`` sees: ``min(i + 1, span + sink)`` (the sink and window never overlap
    in count because sink keys are only counted when they lie outside the window)."""
    return np.minimum(np.asarray(i) + 1, np.asarray(span) + np.asarray(sink))


def kv_density(sink: ArrayLike, span: ArrayLike, n: ArrayLike) -> np.ndarray:
    """Share of the ``N`` keys a head's cache must hold after a length-``N`` input."""
    n = np.asarray(n, dtype=np.int64)
    return np.minimum(n, np.asarray(sink) + np.asarray(span)) / n


def attention_density(sink: ArrayLike, span: ArrayLike, n: ArrayLike) -> np.ndarray:
    """Computed causal entries over ``N(N+1)/2`` for a length-``N`` prefill.

    Row ``i`` keeps ``min(i+1, c)`` keys with ``c = sink + span``, so the total is
    ``sum_{k=1..N} min(k, c) = c(c+1)/2 + (N - c)c`` when ``c < N``.
    """
    n = np.asarray(n, dtype=np.int64)
    c = np.minimum(np.asarray(sink, dtype=np.int64) + np.asarray(span, dtype=np.int64), n)
    kept = c * (c + 1) // 2 + (n - c) * c
    return kept / (n * (n + 1) / 2)


def block_attention_density(
    sink: ArrayLike, span: ArrayLike, n: int, block_m: int, block_n: int | None = None
) -> np.ndarray:
    """Share of the causal ``block_m x block_n`` tiles a kernel must visit at length ``n``.

    Vectorised over rules (``sink``/``span`` arrays of any matching shape) and over query
    blocks (``O(n / block_m)`` work per rule).  A tile is visited when it holds at least one
    visible entry; the denominator counts the tiles a dense causal kernel visits.
    """
    block_n = block_n or block_m
    sink = np.asarray(sink, dtype=np.int64)[..., None]
    span = np.asarray(span, dtype=np.int64)[..., None]
    q_lo = np.arange(0, n, block_m, dtype=np.int64)
    q_hi = np.minimum(q_lo + block_m, n) - 1  # last query row of each block
    last_kb = q_hi // block_n  # diagonal key block (inclusive)
    win_first_key = np.maximum(q_lo - span + 1, 0)  # first row's window start
    win_first_kb = win_first_key // block_n
    sink_keys = np.minimum(sink, q_hi + 1)  # sink keys visible to the block's last row
    sink_blocks = -(-sink_keys // block_n)  # ceil
    window_blocks = last_kb - win_first_kb + 1
    overlap = np.maximum(sink_blocks - win_first_kb, 0)
    visited = np.minimum(sink_blocks + window_blocks - overlap, last_kb + 1)
    return visited.sum(-1) / (last_kb + 1).sum()


@dataclass(frozen=True)
class RuleSpace:
    """The grid of candidate rules the optimizer chooses from; ``full`` is always included.

    A candidate is ``(sink, alpha, beta)`` for every combination of the grids; candidates
    whose span never exceeds ``min_span`` are dropped as duplicates.
    """

    sinks: tuple[int, ...] = (64,)
    alphas: tuple[float, ...] = (0, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
    betas: tuple[float, ...] = tuple(k / 16 for k in range(16))
    min_span: int = 16
    rules: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.sinks or not self.alphas or not self.betas:
            raise ValueError("a rule space needs at least one sink, alpha and beta value")
        candidates: list[Rule] = [Rule.full_attention()]
        for sink, alpha, beta in itertools.product(self.sinks, self.alphas, self.betas):
            if alpha == 0 and beta == 0:
                continue
            candidates.append(Rule(sink=int(sink), alpha=float(alpha), beta=float(beta),
                                   min_span=self.min_span))
        object.__setattr__(self, "rules", tuple(candidates))

    def __len__(self) -> int:
        return len(self.rules)

    def spans(self, lengths: ArrayLike) -> np.ndarray:
        return rule_spans(self.rules, lengths)

    def kv_density(self, lengths: ArrayLike) -> np.ndarray:
        """``(len(space), len(lengths))`` KV densities."""
        lengths = np.asarray(lengths)
        return kv_density(rule_sinks(self.rules, lengths), self.spans(lengths), lengths)

    def attention_density(self, lengths: ArrayLike) -> np.ndarray:
        lengths = np.asarray(lengths)
        return attention_density(rule_sinks(self.rules, lengths), self.spans(lengths), lengths)

    def to_dict(self) -> dict:
        return {"sinks": list(self.sinks), "alphas": list(self.alphas),
                "betas": list(self.betas), "min_span": self.min_span}

    @classmethod
    def from_dict(cls, data: dict) -> RuleSpace:
        return cls(sinks=tuple(int(s) for s in data["sinks"]),
                   alphas=tuple(float(a) for a in data["alphas"]),
                   betas=tuple(float(b) for b in data["betas"]),
                   min_span=int(data.get("min_span", 16)))


def density(rules: Iterable[Rule], n: ArrayLike, kind: str = "kv") -> np.ndarray:
    """Per-rule density of ``kind`` (``"kv"`` or ``"attention"``) at length(s) ``n``."""
    rules = list(rules)
    sinks, spans = rule_sinks(rules, n), rule_spans(rules, n)
    if kind == "kv":
        return kv_density(sinks, spans, n)
    if kind == "attention":
        return attention_density(sinks, spans, n)
    raise ValueError(f"unknown density kind {kind!r}; use 'kv' or 'attention'")
