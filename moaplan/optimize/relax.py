"""A plan and a proven lower bound without the MILP: greedy and Lagrangian relaxation.

The knapsack has only a handful of coupling rows (one per target length, plus per-layer
rows), so its LP relaxation is nearly integral and these two cheap answers usually agree to
within a millionth; :func:`moaplan.optimize.milp.solve` uses them as a certificate before
calling HiGHS, and as the fallback when HiGHS runs out of time.
"""

from __future__ import annotations

import numpy as np

from moaplan.optimize.problem import KnapsackProblem

# Bisection steps along each ray of the Lagrangian search; 50 halvings reach float precision.
_BISECTIONS = 50


def _hull_upgrades(coef_h: np.ndarray, size: np.ndarray, start: int) -> list[tuple]:
    """Upgrades along the lower convex hull of (size, cost) from ``start``, each as
    ``(cost saved per unit of size, from rule, to rule)``; later steps are less efficient."""
    hull = [start]
    for r in np.lexsort((coef_h, size)):
        if size[r] < size[start] or coef_h[r] >= coef_h[hull[-1]]:
            continue
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = ((size[a] - size[o]) * (coef_h[r] - coef_h[o])
                     - (coef_h[a] - coef_h[o]) * (size[r] - size[o]))
            if cross > 0:
                break
            hull.pop()
        hull.append(int(r))
    return [((coef_h[a] - coef_h[b]) / max(size[b] - size[a], 1e-15), a, b)
            for a, b in zip(hull, hull[1:])]


def greedy(problem: KnapsackProblem) -> np.ndarray | None:
    """A feasible plan by the classic multiple-choice knapsack greedy, or None if its start
    (every head on its rule of smallest worst-case density) already breaks a constraint.

    Upgrades from each head's convex hull of worst-case density vs. cost are applied, most
    efficient first, whenever every constraint still holds afterwards.  Density sums are kept
    up to date per move (global and the moved head's layer), so a move costs O(lengths).
    """
    coef = problem.coefficients()
    # (targets, heads, rules) view; a shared density is not copied per head.
    dens = np.broadcast_to(problem.head_density(), (problem.density.shape[0], *coef.shape))
    size = dens.max(axis=0)  # each head's worst-case density of each rule
    # Ties in size go to the rule cheapest over all heads: with a shared density every head
    # then starts on the same rule.
    tie = np.broadcast_to(coef.sum(axis=0), coef.shape)
    choice = np.lexsort((tie, size), axis=-1)[:, 0].astype(np.int64)
    if not problem.is_feasible(choice):
        return None
    groups = problem.groups() or [np.arange(problem.n_heads)]  # no layer bound: one group
    layer = np.empty(problem.n_heads, dtype=np.int64)
    for g, heads in enumerate(groups):
        layer[heads] = g
    per_head_cap = problem.group_max_density if problem.group_max_density is not None else np.inf
    layer_caps = np.array([len(heads) for heads in groups]) * per_head_cap
    chosen = problem.chosen_density(choice)
    layer_total = np.stack([chosen[:, heads].sum(axis=1) for heads in groups])
    total = chosen.sum(axis=1)
    cap = problem.budget * problem.n_heads
    # Slack of 1e-13 per head absorbs the running sums' rounding drift, so a plan exactly at
    # the cap stays reachable; it is below the 1e-12 resolution of the exact final check.
    slack = 1e-13 * problem.n_heads
    moves = [(gain, h, a, b) for h in range(problem.n_heads)
             for gain, a, b in _hull_upgrades(coef[h], size[h], int(choice[h]))]
    moves.sort(key=lambda m: -m[0])
    for _, h, a, b in moves:
        if choice[h] != a:
            continue  # an earlier upgrade of this head did not fit
        delta = dens[:, h, b] - dens[:, h, a]
        g = layer[h]
        if (total + delta > cap + slack).any() or (
                layer_total[g] + delta > layer_caps[g] + slack).any():
            continue
        choice[h] = b
        total += delta
        layer_total[g] += delta
    return choice if problem.is_feasible(choice) else None


def lagrangian_bound(problem: KnapsackProblem) -> float:
    """A proven lower bound on the optimal objective.

    For any ``lam >= 0`` over target lengths,
    ``sum_h min_r (coef[h, r] + lam . density[:, h, r]) - budget * n_heads * sum(lam)`` bounds
    the optimum from below (Lagrangian relaxation of the density rows; relaxing the per-layer
    rows too only lowers it).  Along each ray ``mu * d``
    the bound is concave in ``mu``, so bisection on the sign of its slope finds the ray's best
    point; the rays are each length alone and all lengths equally.
    """
    coef, dens = problem.coefficients(), problem.head_density()
    cap = problem.budget * problem.n_heads
    n_t = dens.shape[0]
    # (targets, heads or 1 x rules): one vector-matrix product prices every (head, rule).
    flat = dens.reshape(n_t, -1)

    def value_and_slope(lam: np.ndarray, d: np.ndarray) -> tuple[float, float]:
        penalised = coef + (lam @ flat).reshape(dens.shape[1:])
        used = problem.chosen_density(penalised.argmin(axis=1)).sum(axis=1)
        return float(penalised.min(axis=1).sum() - cap * lam.sum()), float(d @ (used - cap))

    best = 0.0
    for d in [*np.eye(n_t), np.full(n_t, 1.0 / n_t)]:
        lo, hi = 0.0, 1.0
        while value_and_slope(hi * d, d)[1] > 0 and hi < 1e12:
            lo, hi = hi, hi * 4
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if value_and_slope(mid * d, d)[1] > 0 else (lo, mid)
        best = max(best, value_and_slope(lo * d, d)[0], value_and_slope(hi * d, d)[0])
    return best
