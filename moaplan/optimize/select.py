"""From one knapsack problem to the plan that is kept: a Pareto set over length trade-offs and
an optuna study that picks by *measured* loss.

The optimizer's objective is a prediction (first-order influence at the profiled lengths);
what matters is the loss at lengths that were not profiled.  ``choose`` lets optuna tune the
optimizer's own knob, the weighting of the profiled lengths, against a caller-supplied
``evaluate(solution) -> loss`` (the search command applies the plan and measures held-out
loss).  Identical plans are evaluated once: every trial stores its plan in the study, so the
cache survives interruptions and is shared by all workers on the same storage.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import optuna

from moaplan.errors import MoaplanError
from moaplan.optimize.milp import solve
from moaplan.optimize.problem import KnapsackProblem, Solution

# Weights are sampled log-uniformly in this range, then normalised to sum to one.
_WEIGHT_RANGE = (0.01, 1.0)
# A worker that stops beating its heartbeat for the grace period is taken for dead; its
# trial is failed and re-queued by the next worker (or the next run of the same command).
_HEARTBEAT_S, _GRACE_S = 30, 120


def simplex_weights(n_lengths: int, steps: int) -> list[np.ndarray]:
    """Every weighting of ``n_lengths`` lengths in multiples of ``1 / steps``, summing to one
    (``steps = 1`` gives each length alone; ``steps >= n_lengths`` includes equal weights)."""
    if n_lengths < 1 or steps < 1:
        raise MoaplanError(f"need n_lengths >= 1 and steps >= 1, got {n_lengths}, {steps}")
    grid = []
    for cuts in itertools.combinations(range(steps + n_lengths - 1), n_lengths - 1):
        edges = np.array([-1, *cuts, steps + n_lengths - 1])
        grid.append((np.diff(edges) - 1) / steps)
    return grid


def pareto_plans(problem: KnapsackProblem, weight_grid: Sequence[np.ndarray], *,
                 time_limit: float | None = None, mip_gap: float = 1e-3) -> list[Solution]:
    """One optimal plan per length weighting, duplicates dropped (first weighting wins)."""
    plans: dict[tuple[int, ...], Solution] = {}
    for weights in weight_grid:
        solution = solve(problem.with_weights(weights), time_limit=time_limit, mip_gap=mip_gap)
        plans.setdefault(solution.key(), solution)
    return list(plans.values())


def default_storage(out_path: str | Path) -> str:
    """The SQLite study file beside an output file: ``plan.yaml`` -> ``plan.optuna.db``."""
    return f"sqlite:///{Path(out_path).resolve().with_suffix('.optuna.db')}"


def _plan_digest(solution: Solution) -> str:
    return hashlib.sha1(np.asarray(solution.choice, dtype=np.int64).tobytes()).hexdigest()


def _cached_loss(study: optuna.Study, digest: str) -> float | None:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.user_attrs.get("plan") == digest:
            return trial.value
    return None


def _storage(url: str | None) -> optuna.storages.BaseStorage | None:
    if url is None:
        return None  # in memory: nothing to resume
    try:
        with warnings.catch_warnings():
            # Heartbeats have been "experimental" since optuna 2.8; they are what resumes work.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=_HEARTBEAT_S, grace_period=_GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback())
    except Exception as err:  # sqlalchemy raises many types for a bad URL or server
        raise MoaplanError(f"cannot open the optuna storage {url!r}: {err}") from err


Proposer = Callable[[optuna.Trial], Solution]


def _weight_search(problem: KnapsackProblem, protect: Sequence[int], seed: int,
                   time_limit: float | None, mip_gap: float
                   ) -> tuple[optuna.samplers.BaseSampler, Proposer, dict]:
    """TPE over the length weights and over how many heads of ``protect`` (most important
    first) are kept full; first trial: the problem's own weights, no head kept."""
    def propose(trial: optuna.Trial) -> Solution:
        weights = [trial.suggest_float(f"weight_{i}", *_WEIGHT_RANGE, log=True)
                   for i in range(len(problem.length_weights))]
        kept = trial.suggest_int("keep_full", 0, len(protect)) if protect else 0
        variant = problem.with_weights(np.array(weights)).with_keep_full(protect[:kept])
        return solve(variant, time_limit=time_limit, mip_gap=mip_gap)

    own = np.clip(problem.length_weights / problem.length_weights.max(), *_WEIGHT_RANGE)
    first = {f"weight_{i}": float(w) for i, w in enumerate(own)}
    if protect:
        first["keep_full"] = 0
    return optuna.samplers.TPESampler(seed=seed), propose, first


def _candidate_walk(candidates: list[Solution],
                    seed: int) -> tuple[optuna.samplers.BaseSampler, Proposer, None]:
    """Every candidate once, in a seeded random order."""
    indices = list(range(len(candidates)))

    def propose(trial: optuna.Trial) -> Solution:
        return candidates[trial.suggest_categorical("candidate", indices)]

    return optuna.samplers.GridSampler({"candidate": indices}, seed=seed), propose, None


def choose(source: KnapsackProblem | Sequence[Solution],
           evaluate: Callable[[Solution], float], *, n_trials: int,
           storage: str | None = None, study_name: str = "moaplan", seed: int = 0,
           time_limit: float | None = None, mip_gap: float = 1e-3,
           protect: Sequence[int] = (),
           ) -> tuple[Solution, optuna.Study]:
    """The plan with the lowest measured loss, and the study that found it.

    ``source`` is either a problem, whose length weights optuna tunes (TPE; the first trial
    of a new study uses the problem's own weights; ``time_limit`` and ``mip_gap`` go to each
    :func:`solve`), together with how many of the first heads of ``protect`` (heads, most
    important first) must stay full; or a list of candidate plans (e.g. from
    :func:`pareto_plans`), each tried
    once.  ``storage`` is an RDB URL (``sqlite:///...``, ``postgresql://...``; see
    :func:`default_storage`) or None for in memory.  ``n_trials`` counts the study's completed
    trials, by every worker and every earlier run: after an interruption the same call only
    does what is left.
    """
    if n_trials < 1:
        raise MoaplanError(f"n_trials must be >= 1, got {n_trials}")
    if isinstance(source, KnapsackProblem):
        sampler, propose, first = _weight_search(source, list(protect), seed, time_limit,
                                                 mip_gap)
    else:
        candidates = list(source)
        if not candidates:
            raise MoaplanError("choose() needs at least one candidate plan")
        n_trials = min(n_trials, len(candidates))  # the grid is exhausted after that
        sampler, propose, first = _candidate_walk(candidates, seed)

    study = optuna.create_study(study_name=study_name, storage=_storage(storage),
                                sampler=sampler, direction="minimize", load_if_exists=True)
    if first is not None and not study.trials:
        study.enqueue_trial(first)

    def objective(trial: optuna.Trial) -> float:
        solution = propose(trial)
        digest = _plan_digest(solution)
        trial.set_user_attr("plan", digest)
        trial.set_user_attr("solution", solution.to_dict())
        cached = _cached_loss(study, digest)
        trial.set_user_attr("cached", cached is not None)
        return cached if cached is not None else float(evaluate(solution))

    complete = (optuna.trial.TrialState.COMPLETE,)
    done = len(study.get_trials(deepcopy=False, states=complete))
    if done < n_trials:
        # The callback stops this worker once all workers together have completed n_trials.
        study.optimize(objective, n_trials=n_trials - done,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=complete)])
    return Solution.from_dict(study.best_trial.user_attrs["solution"]), study
