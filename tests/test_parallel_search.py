"""Several search workers on one optuna study: they split the candidates, measure none twice,
stop the same ones as one worker, and write the plan one worker writes.  End to end against a
real PostgreSQL server that the test starts and stops itself."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from postgres_server import PostgresServer, Unavailable
from test_search import SEARCH, save_tiny, write_calibration

from moaplan.optimize import Candidate, best_candidate, default_storage, measure, scores
from moaplan.optimize.select import open_study

ROOT = Path(__file__).resolve().parents[1]


def _walk(storage: str | optuna.storages.BaseStorage | None, values: dict[str, list[float]],
          names: list[str], calls: list[str], lag: float = 0.0) -> optuna.Study:
    """One worker: measure candidates whose running scores per step are ``values[name]``,
    ``lag`` seconds per step (so that two workers interleave)."""
    candidates = [Candidate(n, n, prunable=not n.startswith("base")) for n in names]

    def evaluate(index, report):
        calls.append(names[index])
        for step, value in enumerate(values[names[index]]):
            time.sleep(lag)
            report(step, value)
        return values[names[index]][-1], {"seen": names[index]}

    return measure(candidates, evaluate, study=open_study(storage, "s"))


# g3 is stopped at step 1 by one worker (0.21 > the median 0.2 of g1 and g2); with two
# workers, g3's second step comes while g2 may still be measured, so it is measured on and
# must still count as stopped where one worker stops it.  "late" is stopped at step 2, where
# g1 and g2 improve and it does not.
VALUES = {"g1": [0.2, 0.2, 0.05, 0.05], "g2": [0.2, 0.2, 0.06, 0.06], "g3": [0.21] * 4,
          "worse": [5.0] * 4, "late": [0.15] * 4, "good": [0.09, 0.05, 0.01, 0.01],
          "base": [5.0] * 4}
NAMES = list(VALUES)


def test_two_workers_split_the_candidates_and_keep_what_one_keeps(tmp_path) -> None:
    one: list[str] = []
    alone = scores(_walk(None, VALUES, NAMES, one))
    assert [alone[i][0] for i in range(len(NAMES))] == [
        "complete", "complete", "pruned", "pruned", "pruned", "complete", "complete"]
    # Two threads on one in-memory storage (SQLite cannot lock a row: two workers on it may
    # take the same queued trial; the PostgreSQL test below runs processes on a server).
    storage = optuna.storages.InMemoryStorage()
    calls: list[list[str]] = [[], []]
    studies: list[optuna.Study] = []
    workers = [threading.Thread(target=lambda c=c: studies.append(
        _walk(storage, VALUES, NAMES, c, lag=0.05))) for c in calls]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(studies) == 2 and all(calls)  # both returned, each measured something
    assert sorted(calls[0] + calls[1]) == sorted(NAMES)  # every candidate exactly once
    for study in studies:  # each worker sees the same outcome as one worker alone
        assert _same_outcome(scores(study), alone)
        assert NAMES[best_candidate(study)] == "good"


def _same_outcome(mine: dict, alone: dict) -> bool:
    """Equal states, scores and details, but for the worker that measured each."""
    def strip(outcome: dict) -> dict:
        return {k: (s, v, {a: x for a, x in d.items() if a != "worker"})
                for k, (s, v, d) in outcome.items()}
    return strip(mine) == strip(alone)


def test_a_second_queue_entry_and_a_stray_trial_are_skipped(tmp_path) -> None:
    # Two workers that queue at once queue every candidate twice; a trial optuna makes from
    # its sampler when the queue emptied under it names no queued candidate.
    storage = default_storage(tmp_path / "plan.yaml")
    study = open_study(storage, "s")
    for index in (0, 1, 0):
        study.enqueue_trial({"candidate": index}, skip_if_exists=False)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING))
    calls: list[str] = []
    values = {"a": [0.2], "b": [0.1]}
    done = _walk(storage, values, ["a", "b"], calls)
    assert calls == ["a", "b"]
    assert {i: (s, v) for i, (s, v, _) in scores(done).items()} == {
        0: ("complete", 0.2), 1: ("complete", 0.1)}
    skipped = [t for t in done.get_trials() if "skipped" in t.user_attrs]
    assert len(skipped) == 2 and skipped[0].state == optuna.trial.TrialState.PRUNED


def test_a_reference_made_in_parts_is_the_reference_made_at_once(tmp_path) -> None:
    from moaplan.data import model_calibration
    from moaplan.model import load_model
    from moaplan.search import attend_locally
    from moaplan.validation import DenseReference, batches, reference_part

    save_tiny("qwen2", tmp_path / "model")
    model, tokenizer = load_model(tmp_path / "model")
    samples = [s for n, count in ((384, 6), (256, 3)) for s in
               model_calibration(model, tokenizer, length=n, n_samples=count, seed=1)]
    local = attend_locally(model, [256, 384])
    whole = DenseReference(model, samples, local=local)
    units = batches(samples)
    assert sorted(i for rows in units for i in rows) == list(range(9)) and len(units) == 3
    parts = [(rows, reference_part(model, samples, rows, local=local)) for rows in units[::-1]]
    joined = DenseReference.from_parts(samples, parts)  # as workers would, in any order
    for a, b in zip(whole.refs, joined.refs):
        for field in ("positions", "targets", "top_ids", "top_logp", "long_range"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert joined.long_range_share() == whole.long_range_share()


@pytest.fixture(scope="module")
def postgres():
    try:
        server = PostgresServer().start()
    except Unavailable as err:
        pytest.skip(f"no PostgreSQL server for the multi-worker test: {err}")
    try:
        yield server
    finally:
        server.stop()


def _search(cwd: Path, model: Path, data: Path, out: str, storage: list[str]
            ) -> subprocess.Popen:
    # One thread per worker: what the two workers share is the study, not the cores, and the
    # same thread count keeps the floating-point sums of every worker the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    args = ["search", "--budget", "0.5", "--model", str(model), "--data", str(data), *SEARCH,
            "--validation-samples", "12", "--candidates", "6", "--profile",
            "profiles/tiny.safetensors", "--out", out, *storage]
    return subprocess.Popen([sys.executable, "-m", "moaplan", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(worker: subprocess.Popen) -> None:
    output, _ = worker.communicate(timeout=600)
    assert worker.returncode == 0, output


def _without_times(text: str) -> str:
    """The plan less its provenance's time of writing and wall time, the only lines in which
    two runs of one search differ."""
    return "\n".join(line for line in text.splitlines()
                     if not line.strip().startswith(("created:", "seconds:")))


@pytest.mark.slow
def test_two_workers_on_postgresql_write_the_plan_of_one(postgres, tmp_path) -> None:
    save_tiny("qwen2", tmp_path / "model")
    write_calibration(tmp_path / "calib.jsonl")
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    alone.mkdir()
    shared.mkdir()
    _finish(_search(alone, tmp_path / "model", tmp_path / "calib.jsonl", "plan.yaml", []))
    # Both workers start at once with no profile: one profiles, the other waits for it.
    workers = [_search(shared, tmp_path / "model", tmp_path / "calib.jsonl", f"w{i}.yaml",
                       ["--storage", postgres.url]) for i in range(2)]
    for worker in workers:
        _finish(worker)
    written = (alone / "plan.yaml").read_text()
    assert "seconds:" in written and "created:" in written
    for i in range(2):
        assert _without_times((shared / f"w{i}.yaml").read_text()) == _without_times(written)

    # The search's studies: the held-out reference's batches, the head ablations, the
    # candidates.  On a model this small one worker may finish the candidates before the
    # other reaches them; across the three studies both measure, and nothing twice.
    workers_seen = set()
    for name in optuna.study.get_all_study_names(storage=postgres.url):
        counted = [t for t in open_study(postgres.url, name).get_trials()
                   if "candidate" in t.params and "skipped" not in t.user_attrs
                   and t.state in (optuna.trial.TrialState.COMPLETE,
                                   optuna.trial.TrialState.PRUNED)]
        measured = [t.params["candidate"] for t in counted]
        assert measured and sorted(measured) == sorted(set(measured)), name
        workers_seen |= {t.user_attrs["worker"] for t in counted}
    assert len(workers_seen) == 2  # both workers measured
