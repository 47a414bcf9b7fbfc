"""``search``: calibration data -> profile -> optimizer -> validated plan.

The search profiles the model at a few lengths (or reuses a matching profile), builds the
multiple-choice knapsack over the rule space with a density budget at every target length
(the profiled lengths, the validation length and the lengths the plan must extend to), and
lets optuna tune the optimizer's length weights by the *measured* response-token loss on
held-out calibration samples at a length that was not profiled.  The plan with the lowest
measured loss is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moaplan.errors import BudgetError, DataError, ProfileError
from moaplan.optimize import KnapsackProblem, Solution, choose
from moaplan.optimize.milp import check_reachable
from moaplan.plan import Budget, ModelShape, Plan, save_plan
from moaplan.plan.baselines import uniform_rule
from moaplan.profile import (
    Profile,
    calibration_hash,
    checkpoint_path,
    load_profile,
    profile_model,
    save_profile,
)
from moaplan.profile.profile import metadata_path
from moaplan.profile.profiler import response_losses
from moaplan.rules import RuleSpace
from moaplan.runtime import apply, remove

Samples = dict[int, list[Any]]  # length -> calibration samples of that length


@dataclass
class SearchSettings:
    """What to search for; the defaults suit the shipped reference model (4K context)."""

    budget: Budget
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    validation_length: int = 3072
    extend_to: list[int] = field(default_factory=list)
    samples: int = 4
    validation_samples: int = 4
    trials: int = 8
    block: int = 64
    rule_space: RuleSpace = field(default_factory=RuleSpace)
    time_limit: float = 60.0
    layer_max_density: float | None = None  # optional bound on every layer's mean density
    objective: str = "log_odds"  # what the profile differentiates (profiler.OBJECTIVES)
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = sorted(set(self.lengths))
        if self.validation_length in self.lengths:
            raise BudgetError(f"the validation length {self.validation_length} is also profiled; "
                              "validate at a length that was not profiled")
        if min(self.samples, self.validation_samples, self.trials) < 1:
            raise BudgetError("samples, validation samples and trials must all be >= 1")

    @property
    def target_lengths(self) -> list[int]:
        """Every length the plan must meet the budget at."""
        return sorted({*self.lengths, self.validation_length, *self.extend_to})


@dataclass
class SearchResult:
    plan: Plan
    solution: Solution
    profile: Profile
    dense_loss: float  # measured at the validation length
    plan_loss: float
    trials: int


# (length, count, held_out) -> samples of that length; held-out samples are never the ones
# the profile is made from.
SampleSource = Callable[[int, int, bool], list[Any]]


def obtain_profile(model: torch.nn.Module, samples: Samples, path: Path, *, block: int,
                   rule_space: RuleSpace, objective: str = "log_odds",
                   on_sample: Callable | None = None) -> Profile:
    """The profile at ``path`` if it matches this model, block, rule space and lengths, and
    (for a gradient profile) this data and objective; else profile now (checkpointing beside
    ``path`` so an interrupted run resumes) and save it.  A head scorer's profile
    (``moaplan profile --scorer ...``) is used as it is: it was not made from this data."""
    shape = ModelShape.from_config(model.config)
    if path.exists():
        profile = load_profile(path)
        profile.check_model(shape)
        matches = (profile.lengths == sorted(samples) and profile.block == block
                   and profile.rule_space == rule_space and profile.complete
                   and (profile.scorer != "gradient"
                        or (profile.data_hash, profile.objective)
                        == (calibration_hash(samples), objective)))
        if matches:
            return profile
        raise ProfileError(f"{path} was made with other lengths, data, objective, block size or "
                           "rule space; delete it or pass another --profile path")
    profile = profile_model(model, samples, block=block, rule_space=rule_space,
                            objective=objective, checkpoint=path, resume=True,
                            on_sample=on_sample)
    save_profile(profile, path)
    partial = checkpoint_path(path)
    for leftover in (partial, metadata_path(partial)):
        leftover.unlink(missing_ok=True)
    return profile


def target_densities(settings: SearchSettings) -> np.ndarray:
    """``(target lengths, rules)``: the budgeted density of every candidate rule."""
    space, targets = settings.rule_space, settings.target_lengths
    if settings.budget.kind == "kv":
        return space.kv_density(targets).T
    return space.attention_density(targets).T


def check_budget(settings: SearchSettings) -> None:
    """Fail before any profiling if no plan of the rule space meets the budget."""
    density = target_densities(settings)
    check_reachable(KnapsackProblem(cost=np.zeros((1, 1, density.shape[1])), density=density,
                                    budget=settings.budget.value,
                                    target_lengths=tuple(settings.target_lengths)))


def knapsack(profile: Profile, settings: SearchSettings) -> KnapsackProblem:
    space, targets = settings.rule_space, settings.target_lengths
    cost = np.stack([profile.dropped_influence(space.rules, n) for n in settings.lengths])
    cost = cost * space.cost_factors()  # compensating rules' prior discount (RuleSpace)
    density = target_densities(settings)
    shape = profile.model
    layer_of_head = np.repeat(np.arange(shape.num_layers), shape.num_key_value_heads)
    return KnapsackProblem(cost=cost, density=density, budget=settings.budget.value,
                           head_groups=layer_of_head,
                           group_max_density=settings.layer_max_density,
                           target_lengths=tuple(targets))


def protection_order(profile: Profile, settings: SearchSettings) -> list[int]:
    """The heads the search may keep full, most important first: the eighth of all heads
    (at least one) that lose the most under the uniform sink + window rule of this budget,
    each profiled length's loss as a share of all heads' loss at that length.

    First-order influence undervalues heads that retrieve from far back (a needle is in few
    calibration samples, and often close enough to survive a wide window), so the search
    also tries plans that keep the likeliest of them whole and lets the measured loss decide.
    """
    loss = profile.dropped_share(uniform_rule(settings.budget, settings.target_lengths))
    count = max(1, profile.num_heads // 8)
    return [int(h) for h in np.argsort(-loss, kind="stable")[:count] if loss[h] > 0]


def plan_from_solution(solution: Solution, profile: Profile, settings: SearchSettings,
                       provenance: dict[str, Any] | None = None) -> Plan:
    shape = profile.model
    rules = [settings.rule_space.rules[c] for c in solution.choice]
    kv = shape.num_key_value_heads
    by_layer = [rules[i * kv:(i + 1) * kv] for i in range(shape.num_layers)]
    totals = [float(profile.total(n).sum()) for n in settings.lengths]
    predicted = {n: float(c) / t if t else 0.0
                 for n, c, t in zip(settings.lengths, solution.costs, totals)}
    return Plan(model=shape, rules=by_layer, budget=settings.budget,
                lengths=settings.target_lengths, predicted_loss=predicted,
                provenance=dict(provenance or {}))


def measured_loss(model: torch.nn.Module, samples: Sequence[Any]) -> float:
    """Mean response-token cross-entropy over ``samples`` with the model as it is now."""
    return float(np.mean(response_losses(model, samples)))


def search(model: torch.nn.Module, source: SampleSource, settings: SearchSettings, *,
           out: str | Path, profile_path: str | Path, storage: str | None,
           on_sample: Callable | None = None,
           on_trial: Callable[[float], None] | None = None) -> SearchResult:
    """Run the whole search and write the plan to ``out`` (atomically)."""
    start = time.perf_counter()
    check_budget(settings)
    samples = {n: source(n, settings.samples, False) for n in settings.lengths}
    held_out = source(settings.validation_length, settings.validation_samples, True)
    if not held_out:
        raise DataError(f"no held-out samples of length {settings.validation_length}")
    profile = obtain_profile(model, samples, Path(profile_path), block=settings.block,
                             rule_space=settings.rule_space, objective=settings.objective,
                             on_sample=on_sample)
    problem = knapsack(profile, settings)
    dense = measured_loss(model, held_out)

    def evaluate(solution: Solution) -> float:
        apply(model, plan_from_solution(solution, profile, settings))
        try:
            loss = measured_loss(model, held_out)
        finally:
            remove(model)
        if on_trial is not None:
            on_trial(loss)
        return loss

    fingerprint = profile.model.fingerprint or "model"
    study_name = (f"moaplan-{fingerprint}-{profile.data_hash}-{settings.budget.kind}"
                  f"{settings.budget.value}-{'-'.join(map(str, settings.target_lengths))}")
    best, study = choose(problem, evaluate, n_trials=settings.trials, storage=storage,
                         study_name=study_name, seed=settings.seed,
                         time_limit=settings.time_limit,
                         protect=protection_order(profile, settings))
    provenance = {
        "profile": str(profile_path),
        "search": {"validation_length": settings.validation_length,
                   "validation_loss": float(study.best_value), "dense_loss": dense,
                   "trials": len(study.trials), "solver_gap": float(best.gap),
                   "solver_status": best.status,
                   "seconds": round(time.perf_counter() - start, 1)},
    }
    plan = plan_from_solution(best, profile, settings, provenance)
    save_plan(plan, out)
    return SearchResult(plan=plan, solution=best, profile=profile, dense_loss=dense,
                        plan_loss=float(study.best_value), trials=len(study.trials))
