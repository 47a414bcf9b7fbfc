"""Baseline plans to compare searched plans against, at the same density.

- ``uniform_plan``: StreamingLLM-style, the same sink + window for every head.  The window
  is elastic (``beta * N - sink``) so the density equals the budget at every length, which
  is the fair comparison with elastic searched plans.
- ``duo_plan``: DuoAttention-style, the heads with the highest scores full and the rest a
  constant sink + recent window, with as many full heads as the budget allows.
- ``best_duo_plan``: the ``duo_plan`` a user would pick from a profile: of the recent windows
  ``recent``, ``recent / 2``, ... 32, the feasible plan that drops the least influence.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from moaplan.errors import BudgetError
from moaplan.plan.record import Budget, Plan
from moaplan.profile import Profile
from moaplan.rules import Rule, density
from moaplan.shape import ModelShape


def _check_lengths(lengths: list[int]) -> list[int]:
    if not lengths or min(lengths) < 1:
        raise BudgetError(f"give at least one positive target length, got {lengths}")
    return sorted(int(n) for n in lengths)


def uniform_rule(budget: Budget, lengths: list[int], sink: int = 64) -> Rule:
    """The widest single elastic sink + window rule with density <= budget at every length."""
    lengths = _check_lengths(lengths)
    if budget.kind == "kv":
        beta = budget.value
    else:
        # Attention density of keep-c-keys-per-row is ~ 1 - (1 - c/N)^2 for c << N.
        beta = 1 - math.sqrt(1 - budget.value)
    rule = Rule(sink=sink, alpha=-float(sink), beta=beta)
    # Rounding and the sink's share at short lengths can overshoot: narrow until it fits.
    for _ in range(max(lengths)):
        if (density([rule], lengths, budget.kind) <= budget.value + 1e-12).all():
            return rule
        rule = Rule(sink=sink, alpha=rule.alpha - 1, beta=beta)
    raise BudgetError(f"no uniform rule with {sink} sinks reaches {budget.kind} density "
                      f"{budget.value} at lengths {lengths}; lower the sink count")


def uniform_plan(shape: ModelShape, budget: Budget, lengths: list[int], sink: int = 64) -> Plan:
    rule = uniform_rule(budget, lengths, sink)
    rules = [[rule] * shape.num_key_value_heads for _ in range(shape.num_layers)]
    return Plan(model=shape, rules=rules, budget=budget, lengths=sorted(lengths),
                provenance={"baseline": "streaming"})


def duo_plan(shape: ModelShape, head_scores: np.ndarray, budget: Budget, lengths: list[int],
             sink: int = 64, recent: int = 256) -> Plan:
    """Full attention for the highest-scoring heads, ``sink + recent`` for the others.

    ``head_scores`` is ``(num_layers, num_kv_heads)``, higher = more important (e.g. the
    profile's dropped influence of the streaming rule).  The number of full heads is the
    largest that keeps the density within the budget at every target length.
    """
    lengths = _check_lengths(lengths)
    scores = np.asarray(head_scores, dtype=np.float64)
    expected = (shape.num_layers, shape.num_key_value_heads)
    if scores.shape != expected:
        raise BudgetError(f"head scores are {scores.shape}, expected {expected}")
    stream = Rule.window(recent, sink=sink)
    stream_density = density([stream], lengths, budget.kind)[0]
    n_heads = scores.size
    # Average density with k full heads: (k + (H - k) * d_stream) / H <= budget.
    slack = (budget.value - stream_density) / (1 - stream_density + 1e-300)
    if (slack < 0).any():
        worst = lengths[int(np.argmin(slack))]
        raise BudgetError(f"even all-streaming heads ({sink} sinks + {recent} recent) exceed "
                          f"{budget.kind} density {budget.value} at length {worst}; lower "
                          "--recent or raise the budget")
    n_full = int(math.floor(float(slack.min()) * n_heads + 1e-9))
    order = np.argsort(-scores, axis=None, kind="stable")[:n_full]
    full = np.zeros(n_heads, dtype=bool)
    full[order] = True
    full = full.reshape(expected)
    rules = [[Rule.full_attention() if f else stream for f in row] for row in full]
    return Plan(model=shape, rules=rules, budget=budget, lengths=lengths,
                provenance={"baseline": "duo", "full_heads": n_full})


def best_duo_plan(profile: Profile, budget: Budget, lengths: list[int], sink: int = 64,
                  recent: int = 256) -> Plan:
    """The best DuoAttention-style plan from ``profile``: trying the recent windows
    ``recent``, ``recent / 2``, ... down to 32, the feasible one whose rules drop the least
    profiled influence.  A fixed recent window is infeasible at tight budgets and short
    lengths (64 + 256 keys are 31% of 1K), where a shorter one still leaves room for full
    heads; provenance records the window chosen."""
    best, best_cost = None, np.inf
    while recent >= 32:
        try:
            plan = duo_plan(profile.model, profile.duo_scores(sink, recent), budget, lengths,
                            sink, recent)
        except BudgetError:
            recent //= 2
            continue
        cost = float(profile.dropped_share(plan.flat_rules).sum())
        if cost < best_cost:
            best = replace(plan, provenance={**plan.provenance, "recent": recent})
            best_cost = cost
        recent //= 2
    if best is None:
        raise BudgetError(f"no DuoAttention-style plan with {sink} sinks meets {budget.kind} "
                          f"density {budget.value} at lengths {sorted(lengths)}; raise the "
                          "budget or lower --sink")
    return best
