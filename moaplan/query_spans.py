"""Per-query-head prefill spans: a second knapsack, run on a plan whose KV rules are chosen.

A plan's rule per KV head fixes what its cache holds (the sinks and ``span(N)`` keys), and the
KV budget binds that rule: the group's widest.  Within it each query head of the GQA group may
compute a narrower prefill span (:attr:`moaplan.rules.Rule.query_windows`), which saves
prefill work, not memory.  :func:`narrow_query_heads` chooses them under an attention-density
budget: for every query head one window ``(alpha, beta)`` of the rule space (or its KV head's
own), capped at its KV head's span and keeping its sinks, so that the mean attention density
over all query heads meets the budget at every target length and the normalised influence the
query heads drop (the profile's per-query-head summaries) is least.  It is the same
multiple-choice knapsack as the KV plan's (:mod:`moaplan.optimize`), with densities that
differ per head, because a candidate's span is capped at its own KV head's.

A KV head with full attention keeps the rule space's smallest sink for its query heads (a
window of ``N`` keys with those sinks is as wide as full); a compensating rule cannot narrow
(its compensation token is one per group), so its query heads keep its span.

:func:`cap_query_heads` is the one-line heuristic it is measured against: every query head's
span capped at one common window, the widest that meets the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from moaplan.errors import BudgetError
from moaplan.optimize import KnapsackProblem, solve
from moaplan.optimize.problem import mean_density
from moaplan.plan import Budget, Plan
from moaplan.profile import Profile
from moaplan.profile.cost import dropped_at
from moaplan.rules import (
    Rule,
    RuleSpace,
    attention_density,
    density,
    rule_sinks,
    rule_spans,
    span_formula,
)


@dataclass(frozen=True)
class QueryCandidates:
    """The windows every query head of a plan may take (candidate 0: its KV head's own).

    ``windows[c]``: ``(alpha, beta)`` of candidate ``c >= 1`` (row 0 unused);
    ``bases[h]``: KV head ``h``'s rule the windows narrow (a full rule becomes sinks + a span of
    ``N``); ``narrowable[h]``: whether it may carry query windows; ``spans[q, c, i]``: the
    prefill span of query head ``q`` under candidate ``c`` at ``lengths[i]``, ``sinks[q]`` its
    sink tokens; ``attention[q, c, i]``: its attention density.
    """

    plan: Plan
    bases: list[Rule]
    narrowable: np.ndarray
    windows: np.ndarray
    lengths: np.ndarray
    spans: np.ndarray
    sinks: np.ndarray
    attention: np.ndarray

    @property
    def group(self) -> int:
        return self.plan.model.group_size

    def at(self, length: int) -> int:
        return int(np.flatnonzero(self.lengths == length)[0])


def query_candidates(plan: Plan, rule_space: RuleSpace, lengths: list[int]) -> QueryCandidates:
    """Every query head's candidate windows and their spans and densities at ``lengths``."""
    lengths_arr = np.asarray(sorted(set(lengths)), dtype=np.int64)
    group = plan.model.group_size
    windows = sorted({(r.alpha, r.beta) for r in rule_space.rules if not r.full})
    windows_arr = np.array([(np.nan, np.nan), *windows], dtype=np.float64)
    sink = min(rule_space.sinks)
    bases = [Rule(sink=sink, alpha=0.0, beta=1.0) if rule.full
             else replace(rule, query_windows=None) for rule in plan.flat_rules]
    narrowable = np.array([not rule.compensate for rule in plan.flat_rules])
    own = rule_spans(plan.flat_rules, lengths_arr)  # (kv heads, lengths): what the cache keeps
    # A window's span as a query window: from a floor of one key, capped at the rule's span
    # (moaplan.rules.query_spans, vectorised over every KV head and window at once).
    max_span = np.array([np.iinfo(np.int64).max // 4 if b.max_span is None else b.max_span
                         for b in bases], dtype=np.int64)[:, None, None]
    narrow = span_formula(lengths_arr[None, None, :], False, windows_arr[None, 1:, 0, None],
                          windows_arr[None, 1:, 1, None], 1, max_span)
    spans = np.concatenate([own[:, None, :], np.minimum(narrow, own[:, None, :])], 1)
    kv_sinks = rule_sinks(bases, lengths_arr)  # (kv heads, lengths)
    attention = attention_density(kv_sinks[:, None, :], spans, lengths_arr[None, None, :])
    # candidate 0 is the rule itself, exactly as the plan prices it (a compensation included)
    attention[:, 0, :] = density(plan.flat_rules, lengths_arr, "attention")
    fixed = ~narrowable  # every candidate of a rule that cannot narrow is its own
    spans[fixed], attention[fixed] = spans[fixed, :1], attention[fixed, :1]
    return QueryCandidates(
        plan=plan, bases=bases, narrowable=narrowable, windows=windows_arr,
        lengths=lengths_arr, spans=np.repeat(spans, group, 0),
        sinks=np.repeat([b.sink for b in bases], group).astype(np.int64),
        attention=np.repeat(attention, group, 0))


def query_problem(candidates: QueryCandidates, profile: Profile, profiled: list[int],
                  targets: list[int], budget: float,
                  head_factors: np.ndarray | None = None) -> KnapsackProblem:
    """The knapsack over query heads: dropped influence at the ``profiled`` lengths (the
    profile's per-query-head summaries), mean attention density ``<= budget`` at ``targets``.
    ``head_factors`` (one per KV head, the search's ablation correction) scale the costs of
    the KV head's query heads, as they scale the KV head's own in the KV plan."""
    cost = np.stack([
        dropped_at(profile.query_far(n), profile.query_sink(n),
                   candidates.spans[:, :, candidates.at(n)], candidates.sinks[:, None], n,
                   profile.block)
        for n in profiled])
    if head_factors is not None:
        cost = cost * np.repeat(head_factors, candidates.group)[None, :, None]
    density_rows = np.stack([candidates.attention[:, :, candidates.at(n)] for n in targets])
    return KnapsackProblem(cost=cost, density=density_rows, budget=budget,
                           target_lengths=tuple(targets))


def plan_with_choice(candidates: QueryCandidates, choice: np.ndarray) -> Plan:
    """The plan with each query head's chosen window (a group that keeps its KV head's span
    everywhere keeps its rule as it was).  In a group that narrows, a member that keeps its
    KV head's span is written as the rule's ``(alpha, beta)`` from a floor of one key: no
    wider than priced, so the budget still holds."""
    plan, group = candidates.plan, candidates.group
    flat = []
    for h, (rule, base) in enumerate(zip(plan.flat_rules, candidates.bases, strict=True)):
        members = choice[h * group:(h + 1) * group]
        if not candidates.narrowable[h] or not members.any():
            flat.append(rule)
            continue
        pairs = tuple((base.alpha, base.beta) if c == 0 else
                      (float(candidates.windows[c, 0]), float(candidates.windows[c, 1]))
                      for c in members)
        flat.append(replace(base, query_windows=pairs))
    kv = plan.model.num_key_value_heads
    return replace(plan, rules=[flat[i:i + kv] for i in range(0, len(flat), kv)])


def _check_budget(budget: Budget) -> None:
    if budget.kind != "attention":
        raise BudgetError(f"query heads' spans are chosen under an attention budget, got a "
                          f"{budget.kind} budget")


def narrow_query_heads(plan: Plan, profile: Profile, rule_space: RuleSpace,
                       profiled: list[int], targets: list[int], budget: Budget, *,
                       head_factors: np.ndarray | None = None,
                       time_limit: float | None = 60.0) -> Plan:
    """``plan`` with query windows that meet the attention ``budget`` at every ``targets``
    length and drop the least influence at the ``profiled`` lengths (see the module; costs
    scaled per KV head by ``head_factors``).  Raises :class:`BudgetError` where even the
    narrowest windows cannot meet it."""
    _check_budget(budget)
    profile.check_shape(plan.model)
    candidates = query_candidates(plan, rule_space, [*profiled, *targets])
    problem = query_problem(candidates, profile, profiled, targets, budget.value, head_factors)
    return plan_with_choice(candidates, solve(problem, time_limit=time_limit).choice)


def cap_query_heads(plan: Plan, rule_space: RuleSpace, targets: list[int], budget: Budget
                    ) -> Plan:
    """``plan`` with every query head's span capped at one common window of the rule space:
    the widest (by the mean attention density it leaves) that meets the attention ``budget``
    at every target length.  The heuristic :func:`narrow_query_heads` must beat."""
    _check_budget(budget)
    candidates = query_candidates(plan, rule_space, targets)
    # (candidates, targets): every head on one window, as the knapsack compares densities
    mean = mean_density(np.moveaxis(candidates.attention, 0, -1))
    fits = [c for c in range(mean.shape[0]) if (mean[c] <= budget.value).all()]
    if not fits:
        raise BudgetError(f"no common window of the rule space brings the query heads to "
                          f"attention density {budget.value:g}; the narrowest leaves "
                          f"{mean.max(axis=1).min():.4g}")
    widest = max(fits, key=lambda c: (mean[c].sum(), -c))
    return plan_with_choice(candidates, np.full(candidates.spans.shape[0], widest))
