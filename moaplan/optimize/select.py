"""From the optimizer's plans and the baselines to the plan that is kept: an optuna study that
measures every candidate plan on held-out data and keeps the best.

The optimizer's objective is a prediction (influence at the profiled lengths); what matters is
how much of the dense model's behaviour a plan keeps at lengths and on samples it was not
made from.  :func:`measure` queues each candidate as one trial of a study (SQLite by default,
any RDB URL for several workers), stops clearly worse candidates early with optuna's pruner,
and survives interruptions; :func:`pareto_plans` gives the optimizer's plans over several
trade-offs between the profiled lengths.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

from moaplan.errors import MoaplanError
from moaplan.optimize.milp import solve
from moaplan.optimize.problem import KnapsackProblem, Solution

# A worker that stops beating its heartbeat for the grace period is taken for dead; its
# trial is failed and re-queued by the next worker (or the next run of the same command).
_HEARTBEAT_S, _GRACE_S = 30, 120
PRUNE_AFTER = 1  # the first report (step) at which a candidate may be stopped


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


def plan_digest(choice: np.ndarray) -> str:
    """A short name for one plan's rule choice, to recognise the same plan again."""
    return hashlib.sha1(np.asarray(choice, dtype=np.int64).tobytes()).hexdigest()


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


@dataclass(frozen=True)
class Candidate:
    """One plan to measure: a name for the tables, and a digest of its rules (two candidates
    with one digest are one plan, measured once).  ``prunable`` says whether it may be stopped
    early when its running score is clearly worse than the others' (baselines are not, so
    the plan that is kept is never worse than a fully measured baseline)."""

    name: str
    digest: str
    prunable: bool = True


# (candidate index, report) -> (score, details kept with the trial); ``report(step, running
# score)`` lets the study stop a clearly worse candidate early (it raises optuna.TrialPruned).
Evaluate = Callable[[int, Callable[[int, float], None]], tuple[float, dict]]


def open_study(storage: str | None, name: str) -> optuna.Study:
    """The study of one search (created, or loaded to resume): ``storage`` is an RDB URL
    (see :func:`default_storage`) or None for in memory.  From its third measured candidate
    on, a prunable candidate whose running score is worse than the median of the others' at
    the same step is stopped (``MedianPruner``), from the step ``PRUNE_AFTER`` on: with
    8-sample steps, after half of the 32 default samples, when the running mean is already a
    fair estimate (a stricter rule stopped candidates that would have won)."""
    return optuna.create_study(
        study_name=name, storage=_storage(storage), direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=PRUNE_AFTER))


def _finished(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    """Candidate index -> its completed or pruned trial."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return {t.params["candidate"]: t for t in study.get_trials(deepcopy=False, states=done)}


def _waiting(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def measure(candidates: Sequence[Candidate], evaluate: Evaluate, *, study: optuna.Study,
            on_measured: Callable[[int, str, float], None] | None = None) -> optuna.Study:
    """Measure every candidate once, in the given order (put the likeliest first: the
    pruner compares each newcomer with those measured before it), in ``study``
    (:func:`open_study`), and return it.

    Each candidate is one trial, queued up front, so several workers on one study split the
    candidates between them, and an interrupted run measures only what is left: a trial
    that was interrupted or whose worker died (no heartbeat for the grace period) is not
    counted and is queued again.  A candidate whose digest was already measured takes that
    result without running.  ``on_measured(index, state, score)`` is told of each."""
    if not candidates:
        raise MoaplanError("measure() needs at least one candidate plan")
    # A queued trial holds its candidate in the fixed parameters it will be run with.
    queued = {t.system_attrs.get("fixed_params", {}).get("candidate") for t in _waiting(study)}
    for index in range(len(candidates)):
        if index not in _finished(study) and index not in queued:
            study.enqueue_trial({"candidate": index})

    def objective(trial: optuna.Trial) -> float:
        index = trial.suggest_categorical("candidate", list(range(len(candidates))))
        candidate = candidates[index]
        trial.set_user_attr("name", candidate.name)
        trial.set_user_attr("plan", candidate.digest)
        for earlier in _finished(study).values():
            if earlier.user_attrs.get("plan") == candidate.digest:
                for key, value in earlier.user_attrs.items():
                    if key not in ("name", "plan"):
                        trial.set_user_attr(key, value)
                for step, value in earlier.intermediate_values.items():
                    trial.report(value, step)
                if earlier.state == optuna.trial.TrialState.PRUNED:
                    raise optuna.TrialPruned()
                return float(earlier.value)

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if candidate.prunable and trial.should_prune():
                raise optuna.TrialPruned()

        value, details = evaluate(index, report)
        for key, item in details.items():
            trial.set_user_attr(key, item)
        return float(value)

    def told(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_measured is not None and trial.state.is_finished() and "candidate" in trial.params:
            on_measured(trial.params["candidate"], trial.state.name.lower(),
                        _value(trial))

    while _waiting(study):
        study.optimize(objective, n_trials=1, callbacks=[told])
    return study


def _value(trial: optuna.trial.FrozenTrial) -> float:
    """A completed trial's score, or a pruned one's last running score."""
    if trial.value is not None:
        return float(trial.value)
    steps = trial.intermediate_values
    return float(steps[max(steps)]) if steps else float("nan")


def scores(study: optuna.Study) -> dict[int, tuple[str, float, dict]]:
    """Candidate index -> (state, score, details): "complete" with its full score, or
    "pruned" with its last running score."""
    return {index: (t.state.name.lower(), _value(t), dict(t.user_attrs))
            for index, t in _finished(study).items()}


def best_candidate(study: optuna.Study) -> int:
    """The completed candidate with the lowest score (the earliest of equals)."""
    complete = [t for t in _finished(study).values()
                if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise MoaplanError("no candidate plan was measured to the end")
    return int(min(complete, key=lambda t: (t.value, t.params["candidate"])).params["candidate"])
