"""Solve a :class:`KnapsackProblem`: a cvxpy model solved by the HiGHS MILP solver.

Steps: check that the budget is reachable at all (clear error otherwise); take the greedy
plan and the Lagrangian bound (:mod:`moaplan.optimize.relax`), which together often already
prove the plan is within the requested gap; otherwise drop the rules that are dominated for a
head (exact, see :func:`prune_dominated`) and solve the MILP with HiGHS under the time limit,
keeping the better of HiGHS's incumbent and the greedy plan and the larger of the two bounds.
A call always returns a plan (or raises :class:`BudgetError` for an infeasible budget).
"""

from __future__ import annotations

import time
import warnings

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from moaplan.errors import BudgetError
from moaplan.optimize.problem import KnapsackProblem, Solution
from moaplan.optimize.relax import greedy, lagrangian_bound

# HiGHS's primal_solution_status value for "a feasible solution is available".
_HIGHS_FEASIBLE = 2
# Head chunk for the (heads, rules, rules) dominance tensor: ~3M booleans per chunk.
_PRUNE_CHUNK = 64


def _fmt_minima(problem: KnapsackProblem, minima: np.ndarray) -> str:
    return ", ".join(f"{m:.4g} at {problem.length_label(t)}" for t, m in enumerate(minima))


def check_reachable(problem: KnapsackProblem) -> None:
    """Raise :class:`BudgetError` if some target length cannot meet the budget on its own."""
    caps = [("budget", problem.budget, problem.min_mean_density())]
    if problem.group_max_density is not None:
        # The layer whose heads reach the least at each length; with a shared density every
        # layer reaches the global minimum.
        layer_minima = np.max([problem.min_mean_density(g) for g in problem.groups()], axis=0)
        caps.append(("per-layer density bound", problem.group_max_density, layer_minima))
    for name, cap, minima in caps:
        if (minima > cap + 1e-12).any():
            raise BudgetError(f"{name} {cap:g} is below the smallest density this rule space "
                              f"reaches: {_fmt_minima(problem, minima)}")


def _density_order(density: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``(targets, heads, rules)`` densities, ``[head, a, b]`` masks: rule ``a`` is no
    denser than ``b`` at every target length, and sparser at some."""
    d_a, d_b = density[:, :, :, None], density[:, :, None, :]
    return (d_a <= d_b).all(axis=0), (d_a < d_b).any(axis=0)


def prune_dominated(coef: np.ndarray, density: np.ndarray) -> np.ndarray:
    """``(heads, rules)`` mask of the rules worth keeping per head.

    ``density`` is ``(target lengths, rules)`` shared by every head, or ``(target lengths,
    heads, rules)``.  Rule ``a`` dominates rule ``b`` for a head when ``a`` is no denser for
    that head at every target length and costs the head no more (ties broken by index, so of
    two identical rules one stays).  Swapping ``b`` for ``a`` keeps every density and
    per-layer constraint satisfied and does not raise the objective, so some optimal plan uses
    no dominated rule: pruning is exact.  The relation is a strict partial order, so every
    dominated rule is dominated by a kept one.
    """
    n_heads, n_rules = coef.shape
    # A shared density's order is the same for every head: computed once, not per chunk.
    shared = None if density.ndim == 3 else _density_order(density[:, None, :])
    lower_index = np.arange(n_rules)[:, None] < np.arange(n_rules)[None, :]
    keep = np.empty((n_heads, n_rules), dtype=bool)
    for lo in range(0, n_heads, _PRUNE_CHUNK):
        no_denser, sparser = (shared if shared is not None
                              else _density_order(density[:, lo:lo + _PRUNE_CHUNK]))
        c = coef[lo:lo + _PRUNE_CHUNK]
        c_a, c_b = c[:, :, None], c[:, None, :]
        dominates = no_denser & (c_a <= c_b) & (sparser | (c_a < c_b) | lower_index)
        keep[lo:lo + _PRUNE_CHUNK] = ~dominates.any(axis=1)
    return keep


def _constraints(problem: KnapsackProblem, heads: np.ndarray, rules: np.ndarray,
                 x: cp.Variable) -> list:
    n_vars, n_heads = len(heads), problem.n_heads
    assign = sp.csr_matrix((np.ones(n_vars), (heads, np.arange(n_vars))),
                           shape=(n_heads, n_vars))
    dens = problem.pair_density(heads, rules)  # (targets, vars): each variable's own head
    cons = [assign @ x == 1, dens @ x <= problem.budget * n_heads]
    groups = problem.groups()
    if groups:
        # One row per (layer, target length): the layer's summed density.
        layer_of_head = np.searchsorted(np.unique(problem.head_groups), problem.head_groups)
        n_t = dens.shape[0]
        rows = (layer_of_head[heads][None, :] * n_t + np.arange(n_t)[:, None]).ravel()
        cols = np.tile(np.arange(n_vars), n_t)
        layer_dens = sp.csr_matrix((dens.ravel(), (rows, cols)),
                                   shape=(len(groups) * n_t, n_vars))
        sizes = np.repeat([len(g) for g in groups], n_t)
        cons.append(layer_dens @ x <= problem.group_max_density * sizes)
    return cons


def _infeasible(problem: KnapsackProblem) -> BudgetError:
    layer = (f" and per-layer bound {problem.group_max_density:g}"
             if problem.group_max_density is not None else "")
    return BudgetError(f"no plan meets budget {problem.budget:g}{layer} at every target length "
                       f"at once; the smallest density reachable at each length separately is "
                       f"{_fmt_minima(problem, problem.min_mean_density())}")


def run_highs(problem: KnapsackProblem, time_limit: float | None,
               mip_gap: float) -> tuple[np.ndarray | None, float, bool]:
    """HiGHS's ``(incumbent or None, dual bound, solved to the gap)`` for the pruned model."""
    coef = problem.coefficients()
    heads, rules = np.nonzero(prune_dominated(coef, problem.density))
    # HiGHS's tolerances are absolute (1e-7); scale the objective so its largest coefficient
    # is 1, else per-head costs of ~1e-6 drown in them and the dual bound comes out wrong.
    scale = max(float(coef.max()), 1e-300)
    x = cp.Variable(len(heads), boolean=True)
    model = cp.Problem(cp.Minimize(coef[heads, rules] / scale @ x),
                       _constraints(problem, heads, rules, x))
    # Presolve off: pruning already removed what it would, and on these wide models its
    # column scans cost more than they save (measured 14.5 s -> 6.4 s, 1024 heads x 208 rules).
    # Feasibility jump off: on 200k columns it runs for seconds without checking the time
    # limit, and its plan is far worse than the greedy one that is kept anyway.
    options = {"mip_rel_gap": mip_gap, "output_flag": False, "presolve": "off",
               "mip_heuristic_run_feasibility_jump": False}
    if time_limit is not None:
        options["time_limit"] = time_limit
    try:
        with warnings.catch_warnings():
            # cvxpy warns on every time-out; the status and gap say it precisely.
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            model.solve(solver=cp.HIGHS, **options)
    except cp.error.SolverError:
        pass  # stopped without a usable incumbent: handled like a time-out
    if model.status == cp.INFEASIBLE:
        raise _infeasible(problem)
    info = model.solver_stats.extra_stats if model.solver_stats else None
    if info is None:
        return None, 0.0, False
    bound = info.mip_dual_bound * scale if np.isfinite(info.mip_dual_bound) else 0.0
    if info.primal_solution_status != _HIGHS_FEASIBLE or x.value is None:
        return None, bound, False
    picked = np.full((problem.n_heads, problem.n_rules), -1.0)
    picked[heads, rules] = x.value
    choice = picked.argmax(axis=1)
    if not problem.is_feasible(choice):
        # HiGHS lets a row exceed its cap by 1e-6; such a plan is not one we may return.
        # (Tightening that tolerance to 1e-9 slowed 1024-head solves 10x; the greedy plan
        # takes over in this rare case instead.)
        return None, bound, False
    return choice, bound, model.status == cp.OPTIMAL


def _solution(problem: KnapsackProblem, choice: np.ndarray, bound: float, status: str,
              method: str, started: float) -> Solution:
    objective, densities, costs = problem.evaluate(choice)
    bound = min(max(bound, 0.0), objective)  # costs are >= 0; a bound never exceeds a plan
    gap = (objective - bound) / objective if objective > 0 else 0.0
    return Solution(choice=choice, objective=objective, bound=bound, gap=gap,
                    seconds=time.perf_counter() - started, status=status,
                    densities=densities, costs=costs, method=method)


def solve(problem: KnapsackProblem, *, time_limit: float | None = None,
          mip_gap: float = 1e-3) -> Solution:
    """The plan minimising the normalised dropped influence under the density budget.

    ``mip_gap``: relative optimality gap at which to stop.  ``time_limit`` (seconds) covers
    the whole call; HiGHS gets what is left after the greedy step and model building, and
    needs about 2 s of setup on 200k columns before it first checks its clock.
    """
    started = time.perf_counter()
    check_reachable(problem)
    fallback = greedy(problem)
    bound = lagrangian_bound(problem)
    if fallback is not None:
        objective = problem.evaluate(fallback)[0]
        if objective - bound <= mip_gap * objective:
            return _solution(problem, fallback, bound, "optimal", "greedy", started)
    left = None if time_limit is None else max(time_limit - (time.perf_counter() - started),
                                               1e-3)
    choice, highs_bound, solved = run_highs(problem, left, mip_gap)
    bound, method = max(bound, highs_bound), "highs"
    if choice is None or (fallback is not None
                          and problem.evaluate(fallback)[0] < problem.evaluate(choice)[0]):
        choice, method = fallback, "greedy"
    if choice is None:
        raise BudgetError(f"the solver found no plan in time and the greedy fallback cannot meet "
                          f"budget {problem.budget:g}; allow more time (time_limit={time_limit})")
    objective = problem.evaluate(choice)[0]
    solved = solved or objective - bound <= mip_gap * objective
    status = "optimal" if solved else "time_limit"
    return _solution(problem, choice, bound, status, method, started)
