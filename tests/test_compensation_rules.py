"""Compensation tokens in the rule layer: densities against brute force, the rule space's
compensating variants and their cost factors, and plan densities."""

from __future__ import annotations

import numpy as np
import pytest

from moaplan.plan import ModelShape, Plan
from moaplan.rules import Rule, RuleSpace, density


def brute_force(rule: Rule, n: int) -> tuple[float, float]:
    """(KV density, attention density) by counting, the compensation token as one key of
    every row that drops something (and one cache slot if the last row does)."""
    sink, span = int(min(rule.sink, n)), int(rule.span(n))
    entries, last_row = 0, 0
    for i in range(n):
        kept = sum(1 for j in range(i + 1) if j < sink or i - j < span)
        extra = int(rule.compensate and not rule.full and kept < i + 1)
        entries += kept + extra
        last_row = kept + extra
    return last_row / n, entries / (n * (n + 1) / 2)


@pytest.mark.parametrize("rule", [
    Rule(sink=2, alpha=3.0, compensate=True), Rule(alpha=5.0, beta=0.25, compensate=True),
    Rule(sink=40, alpha=1.0, compensate=True), Rule(full=True, compensate=True),
    Rule(sink=1, alpha=2.0)])
@pytest.mark.parametrize("n", [1, 7, 30])
def test_densities_count_the_token_as_one_key(rule, n):
    kv, attention = brute_force(rule, n)
    assert density([rule], n, "kv")[0] == pytest.approx(kv)
    assert density([rule], n, "attention")[0] == pytest.approx(attention)


def test_rule_space_offers_compensating_twins_at_a_discount():
    plain = RuleSpace(sinks=(0, 64), alphas=(0, 128), betas=(0.0, 0.5))
    comp = RuleSpace(sinks=(0, 64), alphas=(0, 128), betas=(0.0, 0.5), compensate=True,
                     compensate_factor=0.6)
    assert len(comp) == 2 * len(plain) - 1  # full has no twin
    assert [r for r in comp.rules if not r.compensate] == list(plain.rules)
    factors = comp.cost_factors()
    assert factors.tolist() == [0.6 if r.compensate else 1.0 for r in comp.rules]
    assert (plain.cost_factors() == 1).all()
    # One extra key where something is dropped, nothing more.
    lengths = [1024, 4096]
    extra = comp.density(lengths)[2::2] - plain.density(lengths)[1:]
    assert np.isin(np.round(extra * np.array(lengths), 9), [0, 1]).all() and extra.any()
    # A profile made for one prices the other: equality ignores the compensation options.
    assert comp == plain and RuleSpace.from_dict(comp.to_dict()).compensate
    assert RuleSpace.from_dict(plain.to_dict()).compensate_factor == 0.75
    with pytest.raises(ValueError, match="compensate_factor"):
        RuleSpace(compensate_factor=1.5)


def test_plan_densities_include_the_token():
    shape = ModelShape(num_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    plan = Plan(shape, [[Rule(sink=4, alpha=60.0, compensate=True), Rule(sink=4, alpha=60.0)]])
    kv = plan.densities([128])["kv"][0, :, 0]
    assert kv.tolist() == [65 / 128, 64 / 128]
