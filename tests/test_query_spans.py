"""Per-query-head prefill spans chosen under an attention budget (moaplan.query_spans)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moaplan.errors import BudgetError, ProfileError
from moaplan.plan import Budget, Plan, load_plan, save_plan
from moaplan.profile import Profile
from moaplan.query_spans import (
    cap_query_heads,
    narrow_query_heads,
    plan_with_choice,
    query_candidates,
    query_problem,
)
from moaplan.rules import Rule, RuleSpace
from moaplan.shape import ModelShape

BLOCK = 16
LENGTHS = [128, 256]
TARGETS = [128, 192, 256]
SPACE = RuleSpace(sinks=(16,), alphas=(0, 16, 32, 64), betas=(0.0, 0.25, 0.5), min_span=16)


def _profile(shape: ModelShape, seed: int = 0, query_heads: bool = True) -> Profile:
    """A profile with random per-query-head summaries; influence falls with block distance
    at a rate that differs per query head, so the heads of one group want different spans."""
    rng = np.random.default_rng(seed)
    profile = Profile(model=shape, block=BLOCK, lengths=LENGTHS,
                      samples={n: 1 for n in LENGTHS}, rule_space=SPACE)
    q_heads = shape.num_layers * shape.num_attention_heads
    decay = rng.uniform(0.05, 2.0, q_heads)
    for n in LENGTHS:
        nblk = n // BLOCK
        far = np.exp(-decay[:, None, None] * np.arange(nblk)[None, :, None]) \
            * rng.uniform(0.5, 1.5, (q_heads, nblk, 2))
        sink = far[:, None] * rng.uniform(0.0, 3.0, (q_heads, 1, 1, 1))
        sink = np.minimum(sink, far[:, None])  # a sink block holds part of its distance's sum
        if not query_heads:  # per KV head only, as a head scorer's profile
            kv, group = profile.num_heads, shape.group_size
            far = far.reshape(kv, group, *far.shape[1:]).sum(1)
            sink = sink.reshape(kv, group, *sink.shape[1:]).sum(1)
        profile.add(n, far, sink, per_query_head=query_heads)
    return profile


def _plan(shape: ModelShape, rules: list[Rule]) -> Plan:
    kv = shape.num_key_value_heads
    return Plan(model=shape, rules=[rules[i:i + kv] for i in range(0, len(rules), kv)],
                budget=Budget("kv", 0.5), lengths=TARGETS)


SHAPE = ModelShape(num_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16)
KV_RULES = [Rule(sink=16, alpha=64, beta=0.25, min_span=16), Rule.full_attention(),
            Rule(sink=16, alpha=32, beta=0.5, min_span=16),
            Rule(sink=16, alpha=32, beta=0.25, min_span=16, compensate=True)]


def _mean_attention(plan: Plan) -> np.ndarray:
    return plan.densities(TARGETS)["attention"].mean((0, 1))


def test_narrowed_plan_meets_the_attention_budget_and_keeps_the_cache(tmp_path):
    plan, profile = _plan(SHAPE, KV_RULES), _profile(SHAPE)
    assert (_mean_attention(plan) > 0.84).all()
    budget = Budget("attention", 0.7)  # the narrowest windows reach 0.54 / 0.42 / 0.35
    narrowed = narrow_query_heads(plan, profile, SPACE, LENGTHS, TARGETS, budget)
    assert (_mean_attention(narrowed) <= budget.value + 1e-12).all()
    # the cache keeps what it kept: the KV rules' sinks and spans are unchanged
    np.testing.assert_array_equal(narrowed.densities(TARGETS)["kv"],
                                  plan.densities(TARGETS)["kv"])
    windows = [r.query_windows for r in narrowed.flat_rules]
    assert windows[3] is None  # a compensating rule cannot narrow
    assert any(w is not None and len(set(w)) > 1 for w in windows)  # members differ
    assert narrowed.flat_rules[1].sink == 16 or narrowed.flat_rules[1].full
    # written and read back as it is
    assert load_plan(save_plan(narrowed, tmp_path / "narrowed.yaml")).rules == narrowed.rules


def test_a_budget_the_plan_already_meets_drops_no_more_than_the_plan():
    """Narrowing is then free: the solver may still narrow a query head whose narrower window
    drops (almost) nothing more, never at a real cost."""
    plan, profile = _plan(SHAPE, KV_RULES), _profile(SHAPE)
    budget = Budget("attention", float(_mean_attention(plan).max()))
    narrowed = narrow_query_heads(plan, profile, SPACE, LENGTHS, TARGETS, budget)
    candidates = query_candidates(plan, SPACE, [*LENGTHS, *TARGETS])
    problem = query_problem(candidates, profile, LENGTHS, TARGETS, budget.value)
    kept = problem.evaluate(np.zeros(problem.n_heads, dtype=np.int64))[0]
    assert _objective(narrowed, candidates, problem) <= kept * (1 + 1e-3)


def _objective(plan: Plan, candidates, problem) -> float:
    group = plan.model.group_size
    choice = [_chosen(candidates, r, g) for r in plan.flat_rules for g in range(group)]
    return problem.evaluate(np.array(choice))[0]


def test_priced_densities_are_the_plans_own():
    """What the knapsack counts is what the plan reports (no narrowed group keeps its own
    span on one member here, where the written span could be narrower than priced)."""
    plan = _plan(SHAPE, KV_RULES)
    candidates = query_candidates(plan, SPACE, TARGETS)
    rng = np.random.default_rng(3)
    choice = rng.integers(1, candidates.windows.shape[0], candidates.spans.shape[0])
    choice[: SHAPE.group_size] = 0  # the first group keeps its rule
    chosen = plan_with_choice(candidates, choice)
    priced = candidates.attention[np.arange(len(choice)), choice].mean(0)
    comp = 3 * SHAPE.group_size  # the compensating head keeps its span whatever is chosen
    assert (candidates.spans[comp:comp + 4, :, :] == candidates.spans[comp:comp + 4, :1, :]).all()
    np.testing.assert_allclose(_mean_attention(chosen), priced, rtol=1e-12)


def test_optimizer_equals_brute_force_on_a_small_model():
    shape = ModelShape(num_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    space = RuleSpace(sinks=(16,), alphas=(16, 64), betas=(0.0, 0.25), min_span=16)
    plan = _plan(shape, [Rule(sink=16, alpha=0, beta=0.5, min_span=16), Rule.full_attention()])
    profile = _profile(shape, seed=5)
    budget = 0.8 * float(_mean_attention(plan).min())
    candidates = query_candidates(plan, space, [*LENGTHS, *TARGETS])
    problem = query_problem(candidates, profile, LENGTHS, TARGETS, budget)
    best = min((c for c in itertools.product(range(problem.n_rules), repeat=problem.n_heads)
                if problem.is_feasible(np.array(c))),
               key=lambda c: problem.evaluate(np.array(c))[0])
    narrowed = narrow_query_heads(plan, profile, space, LENGTHS, TARGETS,
                                  Budget("attention", budget))
    optimum = problem.evaluate(np.array(best))[0]
    assert _objective(narrowed, candidates, problem) <= optimum * (1 + 1e-3) + 1e-15


def _chosen(candidates, rule: Rule, member: int) -> int:
    """The candidate index a written rule's query head took (0: its KV head's own span)."""
    if rule.query_windows is None:
        return 0
    alpha, beta = rule.query_windows[member]
    hits = np.flatnonzero((candidates.windows[:, 0] == alpha) & (candidates.windows[:, 1] == beta))
    return int(hits[0]) if len(hits) else 0


def test_optimizer_drops_no_more_than_the_common_cap():
    plan, profile = _plan(SHAPE, KV_RULES), _profile(SHAPE, seed=1)
    budget = Budget("attention", 0.65)
    capped = cap_query_heads(plan, SPACE, TARGETS, budget)
    assert (_mean_attention(capped) <= budget.value + 1e-12).all()
    narrowed = narrow_query_heads(plan, profile, SPACE, LENGTHS, TARGETS, budget)
    candidates = query_candidates(plan, SPACE, [*LENGTHS, *TARGETS])
    problem = query_problem(candidates, profile, LENGTHS, TARGETS, budget.value)
    assert _objective(narrowed, candidates, problem) < _objective(capped, candidates, problem)


def test_impossible_budgets_and_profiles_without_query_heads_are_clear_errors():
    plan = _plan(SHAPE, KV_RULES)
    with pytest.raises(BudgetError, match="below the smallest density"):
        narrow_query_heads(plan, _profile(SHAPE), SPACE, LENGTHS, TARGETS,
                           Budget("attention", 0.01))
    with pytest.raises(BudgetError, match="no common window"):
        cap_query_heads(plan, SPACE, TARGETS, Budget("attention", 0.01))
    with pytest.raises(BudgetError, match="attention budget"):
        narrow_query_heads(plan, _profile(SHAPE), SPACE, LENGTHS, TARGETS, Budget("kv", 0.5))
    with pytest.raises(ProfileError, match="no per-query-head summaries"):
        narrow_query_heads(plan, _profile(SHAPE, query_heads=False), SPACE, LENGTHS, TARGETS,
                           Budget("attention", 0.3))


def test_a_corrected_kv_head_keeps_more_of_its_query_heads():
    """The search's ablation factors scale a KV head's query heads' costs: a head found to
    lose 100x more than first order predicts gives up less of its query heads' spans."""
    plan, profile = _plan(SHAPE, KV_RULES), _profile(SHAPE, seed=2)
    budget = Budget("attention", 0.7)
    candidates = query_candidates(plan, SPACE, [*LENGTHS, *TARGETS])
    plain = query_problem(candidates, profile, LENGTHS, TARGETS, budget.value)
    factors = np.ones(4)
    factors[2] = 100.0
    group = SHAPE.group_size
    rows = slice(2 * group, 3 * group)

    def dropped_by_head_2(narrowed: Plan) -> float:
        choice = np.array([_chosen(candidates, r, g) for r in narrowed.flat_rules
                           for g in range(group)])
        heads = np.arange(len(choice))
        return float(plain.cost[:, heads, choice][:, rows].sum())

    before = dropped_by_head_2(narrow_query_heads(plan, profile, SPACE, LENGTHS, TARGETS,
                                                  budget))
    after = dropped_by_head_2(narrow_query_heads(plan, profile, SPACE, LENGTHS, TARGETS,
                                                 budget, head_factors=factors))
    assert after < before
