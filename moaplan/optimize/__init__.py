"""The optimizer: one rule per KV head under a density budget (multiple-choice knapsack,
cvxpy + HiGHS), a Pareto set over length trade-offs, and an optuna study that measures
candidate plans on held-out data."""

from moaplan.optimize.milp import prune_dominated, solve
from moaplan.optimize.problem import KnapsackProblem, Solution
from moaplan.optimize.relax import greedy, lagrangian_bound
from moaplan.optimize.select import (
    Candidate,
    best_candidate,
    default_storage,
    measure,
    pareto_plans,
    plan_digest,
    scores,
    simplex_weights,
)

__all__ = [
    "Candidate",
    "KnapsackProblem",
    "Solution",
    "best_candidate",
    "default_storage",
    "greedy",
    "lagrangian_bound",
    "measure",
    "pareto_plans",
    "plan_digest",
    "prune_dominated",
    "scores",
    "simplex_weights",
    "solve",
]
