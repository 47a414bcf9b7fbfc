"""Synthetic knapsack problems with realistic cost structure, for tests and the scale benchmark.

Each head gets a random decay of influence with query-key distance ``d``:
``f(d) = scale * (mix * exp(-d / tau) / tau + (1 - mix) * (d + 1) ** -power)``; local heads
have a short ``tau`` and a steep power law, retrieval-like heads a flat tail.  The dropped
influence of a rule is the sum of ``f`` over the entries it masks, in closed form per row
through prefix sums, so costs fall as the span grows exactly as a profile's would.
"""

from __future__ import annotations

import numpy as np

from moaplan.optimize.problem import KnapsackProblem
from moaplan.rules import RuleSpace, rule_sinks


def masked_mass(f: np.ndarray, sink: np.ndarray, span: np.ndarray, n: int) -> np.ndarray:
    """Sum of ``f(i - j)`` over the entries a (sink, span) rule masks at length ``n``.

    Row ``i`` masks keys ``sink <= j <= i - span``, i.e. distances ``span .. i - sink``, so with
    ``F`` the prefix sum of ``f`` and ``G`` that of ``F`` the total over rows is
    ``G(n-1-sink) - G(span-1) - (n - sink - span) * F(span-1)`` when ``sink + span < n``.
    """
    F = np.concatenate([[0.0], np.cumsum(f[:n])])  # F[x + 1] = sum_{d <= x} f(d)
    G = np.concatenate([[0.0], np.cumsum(F[1:])])  # G[x + 1] = sum_{y <= x} F[y + 1]
    masked = sink + span < n
    s, w = np.where(masked, sink, 0), np.where(masked, span, 1)
    total = G[n - s] - G[w] - (n - s - w) * F[w]
    return np.where(masked, np.maximum(total, 0.0), 0.0)


def synthetic_problem(n_layers: int, heads_per_layer: int, budget: float, *,
                      space: RuleSpace | None = None,
                      profiled_lengths: tuple[int, ...] = (4096, 8192, 16384, 32768),
                      target_lengths: tuple[int, ...] = (4096, 8192, 16384, 32768),
                      seed: int = 0) -> KnapsackProblem:
    """A problem of ``n_layers * heads_per_layer`` heads over ``space`` (default RuleSpace())
    with KV densities at ``target_lengths`` and synthetic costs at ``profiled_lengths``."""
    space = space or RuleSpace()
    rng = np.random.default_rng(seed)
    n_heads = n_layers * heads_per_layer
    d = np.arange(max(profiled_lengths), dtype=np.float64)
    tau = np.exp(rng.uniform(np.log(8), np.log(4096), n_heads))
    power = rng.uniform(0.3, 1.6, n_heads)
    mix = rng.uniform(0.0, 1.0, n_heads)
    scale = rng.lognormal(0.0, 1.0, n_heads)
    cost = np.empty((len(profiled_lengths), n_heads, len(space)))
    shapes = [(rule_sinks(space.rules, n), space.spans(n), n) for n in profiled_lengths]
    for h in range(n_heads):
        f = scale[h] * (mix[h] * np.exp(-d / tau[h]) / tau[h]
                        + (1 - mix[h]) * (d + 1) ** -power[h])
        for li, (sink, span, n) in enumerate(shapes):
            cost[li, h] = masked_mass(f, sink, span, n)
    return KnapsackProblem(cost=cost, density=space.density(target_lengths).T, budget=budget,
                           head_groups=np.repeat(np.arange(n_layers), heads_per_layer),
                           target_lengths=tuple(target_lengths))
