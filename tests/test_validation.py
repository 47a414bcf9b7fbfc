"""Validation scores: KL to the dense model on its own responses, with intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moaplan
from moaplan.data import model_calibration
from moaplan.model import load_model
from moaplan.plan import Budget, ModelShape, uniform_plan
from moaplan.search import attend_locally
from moaplan.validation import DenseReference, Interval, Score, rank_correlation


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = load_model()
    samples = model_calibration(model, tokenizer, length=512, n_samples=4, seed=3)
    return model, DenseReference(model, samples)


def test_dense_scores_zero_and_matches_its_own_answers(reference):
    model, dense = reference
    score = dense.score(model, chunk=3)
    assert len(score.kl) == 4 and max(score.kl) < 1e-6
    assert score.match_rate() == 1.0


def test_a_restricted_plan_diverges_and_reports_every_chunk(reference):
    model, dense = reference
    plan = uniform_plan(ModelShape.from_config(model.config), Budget("kv", 0.2), [512])
    steps = []
    moaplan.apply(model, plan)
    try:
        score = dense.score(model, chunk=3, report=lambda step, s: steps.append((step, len(s.kl))))
    finally:
        moaplan.remove(model)
    assert steps == [(0, 3), (1, 4)]
    assert score.mean_kl > 1e-3 and min(score.kl) >= 0


def test_coarse_kl_is_the_full_kl_for_a_small_vocabulary(reference):
    model, dense = reference
    plan = uniform_plan(ModelShape.from_config(model.config), Budget("kv", 0.3), [512])
    sample, ref = dense.samples[0], dense.refs[0]
    moaplan.apply(model, plan)
    try:
        coarse = dense.score(model).kl[0]
        with torch.no_grad():
            plan_logits = model(input_ids=sample.input_ids[None]).logits[0].float()
    finally:
        moaplan.remove(model)
    with torch.no_grad():
        dense_logits = model(input_ids=sample.input_ids[None]).logits[0].float()
    p = torch.log_softmax(dense_logits[ref.positions], -1)
    q = torch.log_softmax(plan_logits[ref.positions], -1)
    full = float((p.exp() * (p - q)).sum(-1).mean())
    assert coarse == pytest.approx(full, rel=1e-3, abs=1e-6)


def test_intervals_and_paired_differences():
    interval = Interval.of([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == 2.5 and interval.low < 2.5 < interval.high
    assert Interval.of([0.5, 0.5]).low == 0.5  # no spread, no width
    a = Score((0.1, 0.2, 0.3), (True, True, False))
    b = Score((0.2, 0.4, 0.5), (True, False, False))
    diff = a.paired_difference(b)
    assert diff.mean == pytest.approx(-0.5 / 3) and diff.high < 0
    assert a.match_rate() == pytest.approx(2 / 3)
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert np.isnan(rank_correlation([1, 2], [3, 4]))


def test_a_missed_task_counts_on_its_long_range_answer_tokens_alone():
    """A task the dense model missed carries its own answer, teacher-forced; only the tokens
    that need the far context count (the others show how a plan perturbs a guess), and a
    forced answer without one is left out."""
    model, tokenizer = load_model()
    # seed 0 at 1024: passkey and kv answered; repeat missed, with long-range answer tokens;
    # copy missed, with none; text
    samples = model_calibration(model, tokenizer, length=1024, n_samples=5, seed=0)
    assert [s.answered for s in samples] == [True, True, False, False, None]
    dense = DenseReference(model, samples, local=attend_locally(model, [1024]))
    assert dense.samples == [samples[i] for i in (0, 1, 2, 4)]
    forced = dense.refs[2]
    assert forced.forced and 0 < forced.long_range.sum() < len(forced.long_range)
    # without the local plan nothing is told apart: every sample, every token
    assert len(DenseReference(model, samples).samples) == 5

    plan = uniform_plan(ModelShape.from_config(model.config), Budget("kv", 0.3), [1024])
    moaplan.apply(model, plan)
    try:
        score = dense.score(model)
        with torch.no_grad():
            logits = model(input_ids=samples[2].input_ids[None]).logits[0].float()
    finally:
        moaplan.remove(model)
    p = forced.top_logp.exp()
    plan_logp = torch.log_softmax(logits[forced.positions], -1).gather(1, forced.top_ids)
    rest = torch.log1p(-plan_logp.exp().sum(1).clamp(max=1 - 1e-7))
    token_kl = (p * (forced.top_logp - torch.cat([plan_logp, rest[:, None]], 1))).sum(1)
    assert score.kl[2] == pytest.approx(float(token_kl[forced.long_range].mean()), rel=1e-4)
    assert score.kl[2] != pytest.approx(float(token_kl.mean()), rel=1e-2)
