"""The optimizer: one rule per KV head under a density budget (multiple-choice knapsack,
cvxpy + HiGHS), a Pareto set over length trade-offs, and an optuna study that keeps the plan
with the lowest measured loss."""

from moaplan.optimize.milp import prune_dominated, solve
from moaplan.optimize.problem import KnapsackProblem, Solution
from moaplan.optimize.relax import greedy, lagrangian_bound
from moaplan.optimize.select import choose, default_storage, pareto_plans, simplex_weights

__all__ = [
    "KnapsackProblem",
    "Solution",
    "choose",
    "default_storage",
    "greedy",
    "lagrangian_bound",
    "pareto_plans",
    "prune_dominated",
    "simplex_weights",
    "solve",
]
