"""From the optimizer's plans and the baselines to the plan that is kept: an optuna study that
measures every candidate plan on held-out data and keeps the best.

The optimizer's objective is a prediction (influence at the profiled lengths); what matters is
how much of the dense model's behaviour a plan keeps at lengths and on samples it was not
made from.  :func:`measure` queues each candidate as one trial of a study (SQLite by default,
for one worker: it cannot lock a row, and two workers could take one queued trial; a database
server's URL for several), stops clearly worse candidates early (a median rule over the
candidates before it in their order, so that several workers keep what one would keep),
and survives interruptions; :func:`pareto_plans` gives the optimizer's plans over several
trade-offs between the profiled lengths.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
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
PRUNE_STARTUP = 2  # candidates measured to the end before any is stopped
_POLL_S = 0.25  # how often a worker with nothing left looks at the others' trials
_SCHEMA_TRIES = 5
_RACE_WORDS = ("already exists", "duplicate key", "unique constraint")
# A trial that measure() closes without measuring anything carries this user attribute and is
# never counted: a second queue entry for one candidate (two workers queued at once), or a trial
# optuna made from its sampler because another worker emptied the queue first.
_SKIPPED = "skipped"
# The user attributes measure() sets itself; "worker" (host:pid) says who measured a candidate.
_OWN_ATTRS = ("name", "plan", "prunable", "worker")
_WAITING, _RUNNING = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING
_COMPLETE, _PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


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
    for attempt in range(_SCHEMA_TRIES):
        try:
            with warnings.catch_warnings():
                # Heartbeats have been "experimental" since optuna 2.8; they resume work.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=_HEARTBEAT_S, grace_period=_GRACE_S,
                    heartbeat_stale_trial_callback=(
                        optuna.storages.RetryHeartbeatStaleTrialCallback()))
        except Exception as err:  # sqlalchemy raises many types for a bad URL or server
            # Workers that open a new storage at once race to create its tables: the loser
            # finds them made, and opens them at the next try.
            racing = any(word in str(err).lower() for word in _RACE_WORDS)
            if not racing or attempt == _SCHEMA_TRIES - 1:
                raise MoaplanError(f"cannot open the optuna storage {url!r}: {err}") from err
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


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


def open_study(storage: str | optuna.storages.BaseStorage | None, name: str) -> optuna.Study:
    """The study of one search (created, or loaded to resume): ``storage`` is an RDB URL
    (see :func:`default_storage`), None for in memory, or an optuna storage (one in-memory
    storage shared by threads, say).  :func:`measure` decides itself
    which candidates to stop early (:func:`stop_step`), so the study's pruner is never asked;
    its sampler only names the candidate of a trial that :func:`measure` then skips."""
    return optuna.create_study(
        study_name=name, direction="minimize", load_if_exists=True,
        storage=storage if isinstance(storage, optuna.storages.BaseStorage) else _storage(storage),
        sampler=optuna.samplers.RandomSampler(seed=0), pruner=optuna.pruners.NopPruner())


def stop_step(values: Mapping[int, float], earlier: Sequence[Mapping[int, float]]
              ) -> int | None:
    """The step at which a prunable candidate with running scores ``values`` (step -> score)
    is stopped, or None: ``earlier`` are the running scores of the candidates before it (in
    the candidates' order) that were measured to the end.  From the candidate after the first
    ``PRUNE_STARTUP`` measured to the end on, a candidate whose best running score is worse
    than the median of the earlier ones' at the same step is stopped, from the step
    ``PRUNE_AFTER`` on: with 8-sample steps, after half of the 32 default samples, when the
    running mean is already a fair estimate (a stricter rule stopped candidates that would
    have won).

    This is optuna's ``MedianPruner(n_startup_trials=2, n_warmup_steps=PRUNE_AFTER)`` with
    one difference, why it is not used: its peers are the trials that happen to be complete
    when it is asked, which depends on how many workers run and how fast, so two workers
    could stop (and so keep) other candidates than one.  Here the peers are fixed by the
    candidates' order, and every worker count keeps the same plan."""
    if len(earlier) < PRUNE_STARTUP:
        return None
    seen: list[float] = []
    for step in sorted(values):
        seen.append(values[step])
        if step < PRUNE_AFTER:
            continue
        best = min((v for v in seen if not math.isnan(v)), default=math.nan)
        if math.isnan(best):
            return step  # a score that is not a number is never kept
        peers = [e[step] for e in earlier if step in e and not math.isnan(e[step])]
        if peers and best > float(np.percentile(peers, 50)):
            return step
    return None


def _candidate(trial: optuna.trial.FrozenTrial) -> int | None:
    """The candidate a trial measures (a queued one holds it in its fixed parameters)."""
    return trial.params.get("candidate",
                            trial.system_attrs.get("fixed_params", {}).get("candidate"))


def _counted(trial: optuna.trial.FrozenTrial) -> bool:
    return (trial.state in (_COMPLETE, _PRUNED) and "candidate" in trial.params
            and _SKIPPED not in trial.user_attrs)


def _finished(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    """Candidate index -> its completed or pruned trial."""
    return {t.params["candidate"]: t for t in study.get_trials(deepcopy=False) if _counted(t)}


def _outcomes(finished: Mapping[int, optuna.trial.FrozenTrial]
              ) -> dict[int, tuple[str, float]]:
    """Candidate index -> ("complete", score) or ("pruned", running score where it stopped):
    :func:`stop_step` replayed in the candidates' order.  A candidate that one worker would
    have stopped may have been measured further while a candidate before it was still being
    measured by another worker (its stop could not be decided yet); it counts as stopped
    where one worker would have stopped it.  A trial stored as pruned by another rule (an
    older study, or a copy of a pruned trial with the same plan) stays pruned at its last
    step."""
    earlier: list[Mapping[int, float]] = []
    out: dict[int, tuple[str, float]] = {}
    for index in sorted(finished):
        trial = finished[index]
        steps = trial.intermediate_values
        stop = stop_step(steps, earlier) if trial.user_attrs.get("prunable") else None
        if stop is None and trial.state == _PRUNED:
            stop = max(steps, default=-1)
        if stop is None:
            earlier.append(steps)
            out[index] = ("complete", float(trial.value))
        else:
            out[index] = ("pruned", float(steps.get(stop, math.nan)))
    return out


def _taken(trials: Sequence[optuna.trial.FrozenTrial], index: int, number: int) -> bool:
    """Whether candidate ``index`` is measured by a trial other than trial ``number``: one
    that is counted, or an earlier queue entry that is waiting or running."""
    return any(t.number != number and _candidate(t) == index
               and (_counted(t) or (t.state in (_WAITING, _RUNNING) and t.number < number))
               for t in trials)


def _fail_stale(study: optuna.Study) -> None:
    """Fail (and so queue again) the trials of workers that stopped beating their heart."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def measure(candidates: Sequence[Candidate], evaluate: Evaluate, *, study: optuna.Study,
            on_measured: Callable[[int, str, float], None] | None = None) -> optuna.Study:
    """Measure every candidate once, in the given order (put the likeliest first: a
    candidate is compared with those before it, :func:`stop_step`), in ``study``
    (:func:`open_study`), and return it when every candidate is measured.

    Each candidate is one trial, queued up front, so several workers on one study (processes
    given one RDB URL) split the candidates between them: each takes the next queued trial,
    none is measured twice, and a worker that finds nothing left waits for the others' trials
    (a dead worker's is queued again after the heartbeat grace period), so that every worker
    returns the same finished study.  An interrupted run measures only what is left: a trial
    that was interrupted or whose worker died is not counted and is queued again.  A
    candidate whose digest was already measured takes that result without running.
    ``on_measured(index, state, score)`` is told of each trial this worker finishes."""
    if not candidates:
        raise MoaplanError("measure() needs at least one candidate plan")
    # Queue what is neither measured nor queued nor being measured; two workers that queue at
    # once queue a candidate twice, and the later entry is skipped (objective below).  The
    # candidates that are never stopped go first: stops are decided by the candidates' order,
    # not the queue's, and these always cost a full measurement, so several workers start on
    # them rather than finish on one while the others wait.
    present = {_candidate(t) for t in study.get_trials(deepcopy=False)
               if _counted(t) or t.state in (_WAITING, _RUNNING)}
    for index in sorted(range(len(candidates)), key=lambda i: candidates[i].prunable):
        if index not in present:
            study.enqueue_trial({"candidate": index})

    def objective(trial: optuna.Trial) -> float:
        trials = study.get_trials(deepcopy=False)
        queued = _candidate(next(t for t in trials if t.number == trial.number))
        if queued is None or _taken(trials, queued, trial.number):
            trial.set_user_attr(_SKIPPED, True)
            raise optuna.TrialPruned()
        index = trial.suggest_categorical("candidate", list(range(len(candidates))))
        candidate = candidates[index]
        trial.set_user_attr("name", candidate.name)
        trial.set_user_attr("plan", candidate.digest)
        trial.set_user_attr("prunable", candidate.prunable)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        for earlier in _finished(study).values():
            if earlier.user_attrs.get("plan") == candidate.digest:
                for key, value in earlier.user_attrs.items():
                    if key not in _OWN_ATTRS:
                        trial.set_user_attr(key, value)
                for step, value in earlier.intermediate_values.items():
                    trial.report(value, step)
                if earlier.state == _PRUNED:
                    raise optuna.TrialPruned()
                return float(earlier.value)
        running: dict[int, float] = {}

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            running[step] = value
            if not candidate.prunable or step < PRUNE_AFTER:
                return
            finished = _finished(study)
            if any(j not in finished for j in range(index)):
                return  # a candidate before it is still measured elsewhere: decide later
            outcomes = _outcomes({j: finished[j] for j in range(index)})
            complete = [finished[j].intermediate_values for j in range(index)
                        if outcomes[j][0] == "complete"]
            if stop_step(running, complete) is not None:
                raise optuna.TrialPruned()

        value, details = evaluate(index, report)
        for key, item in details.items():
            trial.set_user_attr(key, item)
        return float(value)

    def told(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_measured is not None and trial.state.is_finished() and "candidate" in trial.params:
            on_measured(trial.params["candidate"], trial.state.name.lower(),
                        _value(trial))

    while True:
        live = study.get_trials(deepcopy=False, states=(_WAITING, _RUNNING))
        if any(t.state == _WAITING for t in live):
            study.optimize(objective, n_trials=1, callbacks=[told])
        elif live:  # the others' trials: every worker's plan needs them all
            _fail_stale(study)
            time.sleep(_POLL_S)
        else:
            return study


def _value(trial: optuna.trial.FrozenTrial) -> float:
    """A completed trial's score, or a pruned one's last running score."""
    if trial.value is not None:
        return float(trial.value)
    steps = trial.intermediate_values
    return float(steps[max(steps)]) if steps else float("nan")


def scores(study: optuna.Study) -> dict[int, tuple[str, float, dict]]:
    """Candidate index -> (state, score, details): "complete" with its full score and
    details, or "pruned" with the running score where it was stopped (and no details, as if
    it had been stopped there, :func:`_outcomes`)."""
    finished = _finished(study)
    out = {}
    for index, (state, value) in _outcomes(finished).items():
        attrs = dict(finished[index].user_attrs)
        if state == "pruned":
            attrs = {k: v for k, v in attrs.items() if k in _OWN_ATTRS}
        out[index] = (state, value, attrs)
    return out


def best_candidate(study: optuna.Study) -> int:
    """The completed candidate with the lowest score (the earliest of equals)."""
    complete = [(value, index) for index, (state, value) in _outcomes(_finished(study)).items()
                if state == "complete"]
    if not complete:
        raise MoaplanError("no candidate plan was measured to the end")
    return min(complete)[1]
