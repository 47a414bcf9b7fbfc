"""``search``: calibration data -> profile -> ablations -> optimizer -> validated plan.

1. Profile the model at a few lengths (or reuse a matching profile).
2. Correct the profile beyond first order: for the heads it ranks highest, restrict one KV
   head at a time to the budget's uniform rule and measure what the model loses
   (:func:`ablate`); the first-order influence of many small entries and of the one entry
   that carries a needle add up linearly, dropping the needle does not.
3. Build the candidates: the multiple-choice knapsack over the rule space (a density budget
   at every target length) with first-order and corrected costs, with the heads that lose
   most kept full or not, the "top heads full, the rest one uniform rule" plans a head scorer
   gives, and the baselines (streaming, DuoAttention-style) at the same budget.
   With an attention budget, every candidate's query heads then get their own prefill spans
   under it (:mod:`moaplan.query_spans`; the KV rules, and so the cache, stay), and the KV
   optimizer's plan also comes with the common cap of every query head's span, the heuristic.
4. Measure every candidate on held-out samples that were not profiled (disjoint by
   construction, at an unprofiled length and the longest profiled one) by KL(dense || plan)
   on the dense model's own responses (:mod:`moaplan.validation`), in one optuna study, and
   write the candidate with the lowest mean KL.  It is never worse there than a baseline;
   the provenance keeps every candidate's KL and its 95% paired interval against the chosen.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moaplan.errors import BudgetError, DataError, ProfileError
from moaplan.optimize import Candidate, KnapsackProblem, best_candidate, measure, solve
from moaplan.optimize.milp import check_reachable
from moaplan.optimize.select import open_study, scores
from moaplan.plan import Budget, Plan, best_duo_plan, save_plan, uniform_plan
from moaplan.plan.baselines import uniform_rule
from moaplan.profile import (
    Profile,
    calibration_hash,
    load_profile,
)
from moaplan.profile.profiler import profile_to_file
from moaplan.profile.record import BLOCK
from moaplan.query_spans import cap_query_heads, narrow_query_heads
from moaplan.rules import Rule, RuleSpace
from moaplan.runtime import apply, remove
from moaplan.shape import ModelShape
from moaplan.validation import DenseReference, Score, batches, rank_correlation, reference_part

Samples = dict[int, list[Any]]  # length -> calibration samples of that length


@dataclass
class SearchSettings:
    """What to search for; the defaults suit the shipped reference model (4K context)."""

    budget: Budget
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    validation_length: int = 3072
    extend_to: list[int] = field(default_factory=list)
    samples: int = 4
    validation_samples: int = 32
    candidates: int = 12  # at most this many candidate plans are measured
    ablate: int = 32  # heads whose restriction is measured one at a time (0: none)
    block: int = BLOCK
    rule_space: RuleSpace = field(default_factory=RuleSpace)
    time_limit: float = 60.0
    layer_max_density: float | None = None  # optional bound on every layer's mean density
    # Optional attention-density budget of a KV-budget search, met by per-query-head spans
    attention_budget: float | None = None
    objective: str = "log_odds"  # what the profile differentiates (profiler.OBJECTIVES)
    seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = sorted(set(self.lengths))
        if self.validation_length in self.lengths:
            raise BudgetError(f"the validation length {self.validation_length} is also profiled; "
                              "validate at a length that was not profiled")
        if min(self.samples, self.validation_samples, self.candidates) < 1:
            raise BudgetError("samples, validation samples and candidates must all be >= 1")
        if self.validation_samples < 2 * len(self.validation_lengths):
            raise BudgetError(f"give at least {2 * len(self.validation_lengths)} validation "
                              f"samples (two per validation length)")
        if self.ablate < 0:
            raise BudgetError(f"the number of heads to ablate must be >= 0, got {self.ablate}")
        if self.attention_budget is not None:
            if self.budget.kind != "kv":
                raise BudgetError("an attention budget narrows the query heads of a KV-budget "
                                  "search; with an attention --density the budget already "
                                  "bounds the prefill")
            Budget("attention", self.attention_budget)  # a density, or a clear error

    @property
    def target_lengths(self) -> list[int]:
        """Every length the plan must meet the budget at."""
        return sorted({*self.lengths, self.validation_length, *self.extend_to})

    @property
    def validation_lengths(self) -> list[int]:
        """The held-out samples' lengths: the shortest and the longest profiled one and the
        unprofiled validation length.  The shortest matters as much as the longest: sinks
        cost most of a budget there, and a plan that keeps far needles at 4K can lose them at
        1K (measured: retrieval 0.45 at 1K beside 0.97 at 2K, when only 3K and 4K were
        validated)."""
        return sorted({min(self.lengths), self.validation_length, max(self.lengths)})

    def validation_counts(self) -> dict[int, int]:
        """Held-out samples per validation length (split as evenly as possible)."""
        lengths = self.validation_lengths
        base, extra = divmod(self.validation_samples, len(lengths))
        return {n: base + (i < extra) for i, n in enumerate(lengths)}


@dataclass(frozen=True)
class Measured:
    """One candidate plan and what was measured of it."""

    name: str
    plan: Plan
    state: str  # "complete", "pruned" (stopped early: clearly worse), or "not measured"
    value: float  # mean KL (complete) or the running mean when it was stopped
    score: Score | None  # every sample's KL and match, for a complete candidate
    predicted: float  # first-order dropped share (mean over profiled lengths)
    corrected: float  # the same with the ablation-corrected costs


@dataclass
class SearchResult:
    plan: Plan
    chosen: str
    candidates: list[Measured]
    profile: Profile
    ablation: dict[int, float]  # KV head -> measured KL with that head alone restricted
    agreement: dict[str, float]  # rank correlation of predicted vs measured, before / after
    forced: int  # held-out tasks the dense model missed, scored on their own answer


# (length, count, held_out) -> samples of that length; held-out samples are never the ones
# the profile is made from.
SampleSource = Callable[[int, int, bool], list[Any]]
# Progress callback: (stage, done, total, note).
OnStep = Callable[[str, int, int, str], None]


@contextmanager
def _profiling_lock(path: Path) -> Iterator[None]:
    """Held while the profile at ``path`` is read or made: search workers started together
    on one host (or on hosts sharing a file system with working locks) profile once, and the
    others wait for that profile instead of writing the same checkpoint at the same time.
    The lock is on the profile's folder, so that it leaves no lock file behind (a lock file
    cannot be removed safely while another worker waits on it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # closing the descriptor releases the lock


def obtain_profile(model: torch.nn.Module, samples: Samples, path: Path, *, block: int = BLOCK,
                   rule_space: RuleSpace | None = None, objective: str = "log_odds",
                   gradient_checkpointing: bool = False, on_sample: Callable | None = None
                   ) -> Profile:
    """The profile at ``path`` if it matches this model, block, rule space and lengths, and
    (for a gradient profile) this data and objective; else profile now (checkpointing beside
    ``path`` so an interrupted run resumes) and save it.  A head scorer's profile
    (``moaplan profile --scorer ...``) is used as it is: it was not made from this data."""
    rule_space = rule_space or RuleSpace()
    shape = ModelShape.from_config(model.config)
    if path.exists():
        profile = load_profile(path)
        profile.check_shape(shape)
        matches = (profile.lengths == sorted(samples) and profile.block == block
                   and profile.rule_space == rule_space and profile.complete
                   and (profile.scorer != "gradient"
                        or (profile.data_hash, profile.objective)
                        == (calibration_hash(samples), objective)))
        if matches:
            return profile
        raise ProfileError(f"{path} was made with other lengths, data, objective, block size or "
                           "rule space; delete it or pass another --profile path")
    return profile_to_file(model, samples, path, block=block, rule_space=rule_space,
                           objective=objective, gradient_checkpointing=gradient_checkpointing,
                           on_sample=on_sample)


def target_densities(settings: SearchSettings, kind: str | None = None) -> np.ndarray:
    """``(target lengths, rules)``: the density of ``kind`` (default: the budget's) of every
    candidate rule."""
    return settings.rule_space.density(settings.target_lengths, kind or settings.budget.kind).T


def check_budget(settings: SearchSettings) -> None:
    """Fail before any profiling if no plan of the rule space meets the budget (or the
    attention budget: no query head can be narrower than the space's narrowest rule)."""
    budgets = [(settings.budget.kind, settings.budget.value)]
    if settings.attention_budget is not None:
        budgets.append(("attention", settings.attention_budget))
    for kind, value in budgets:
        density = target_densities(settings, kind)
        check_reachable(KnapsackProblem(cost=np.zeros((1, 1, density.shape[1])),
                                        density=density, budget=value,
                                        target_lengths=tuple(settings.target_lengths)))


def knapsack(profile: Profile, settings: SearchSettings,
             head_factors: np.ndarray | None = None) -> KnapsackProblem:
    """The optimizer's problem; ``head_factors`` (one per KV head) scale each head's costs
    (the ablation correction, :func:`correction_factors`)."""
    space, targets = settings.rule_space, settings.target_lengths
    cost = np.stack([profile.dropped_influence(space.rules, n) for n in settings.lengths])
    cost = cost * space.cost_factors()  # compensating rules' prior discount (RuleSpace)
    if head_factors is not None:
        cost = cost * head_factors[None, :, None]
    density = target_densities(settings)
    shape = profile.model
    layer_of_head = np.repeat(np.arange(shape.num_layers), shape.num_key_value_heads)
    return KnapsackProblem(cost=cost, density=density, budget=settings.budget.value,
                           head_groups=layer_of_head,
                           group_max_density=settings.layer_max_density,
                           target_lengths=tuple(targets))


def _single_head_plan(shape: ModelShape, head: int, rule: Rule, settings: SearchSettings
                      ) -> Plan:
    rules = [[Rule.full_attention()] * shape.num_key_value_heads for _ in range(shape.num_layers)]
    layer, kv = divmod(head, shape.num_key_value_heads)
    rules[layer][kv] = rule
    return Plan(model=shape, rules=rules, budget=settings.budget,
                lengths=settings.target_lengths)


def _scored(model: torch.nn.Module, plan: Plan, reference: DenseReference,
            report: Callable[[int, Score], None] | None = None) -> Score:
    apply(model, plan)
    try:
        return reference.score(model, report=report)
    finally:
        remove(model)


# What a token can lean on without long-range attention: the sinks and the recent window of
# DuoAttention's streaming heads.  Tokens the dense model predicts much better with the whole
# context are the long-range tokens (moaplan.validation).
LOCAL_RULE = Rule.window(256, sink=64)


def attend_locally(model: torch.nn.Module, lengths: list[int]) -> Callable[[], Callable]:
    """A callable that makes every head of ``model`` follow :data:`LOCAL_RULE` and returns
    the callable that undoes it (``DenseReference``'s ``local``)."""
    shape = ModelShape.from_config(model.config)
    plan = Plan(model=shape, rules=[[LOCAL_RULE] * shape.num_key_value_heads
                                    for _ in range(shape.num_layers)],
                budget=Budget("kv", 1.0), lengths=sorted(lengths))

    def local() -> Callable[[], None]:
        apply(model, plan)
        return lambda: remove(model)

    return local


def ablate(model: torch.nn.Module, profile: Profile, settings: SearchSettings,
           reference: DenseReference, on_step: OnStep | None = None, *,
           storage: str | None = None, study_name: str = "ablation") -> dict[int, float]:
    """KV head -> validation score (``reference``: the calibration samples of one length)
    when that head alone takes the budget's uniform rule, for the ``settings.ablate`` heads
    that lose the largest share of their influence under that rule (DuoAttention's and
    AttentionInfluence's measurement).  Each head is one trial of the study ``study_name`` in
    ``storage`` (:func:`~moaplan.optimize.measure`, never stopped early), so workers that
    share the storage split the heads, and an interrupted run measures only what is left."""
    if not settings.ablate:
        return {}
    rule = uniform_rule(settings.budget, settings.target_lengths)
    share = profile.dropped_share(rule)
    heads = [int(h) for h in np.argsort(-share, kind="stable")[:settings.ablate]
             if share[h] > 0]
    if not heads:
        return {}
    plans = [_single_head_plan(profile.model, head, rule, settings) for head in heads]
    done = 0

    def evaluate(index: int, report: Callable[[int, float], None]) -> tuple[float, dict]:
        return _scored(model, plans[index], reference).mean_kl, {}

    def measured_one(index: int, state: str, value: float) -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step("ablate", done, len(heads), f"head {heads[index]}")

    study = measure([Candidate(f"head {h}", f"head {h}", prunable=False) for h in heads],
                    evaluate, study=open_study(storage, study_name), on_measured=measured_one)
    return {heads[index]: value for index, (_, value, _) in sorted(scores(study).items())}


# A measured head's costs are scaled up by at most this factor.
_MAX_CORRECTION = 100.0


def correction_factors(profile: Profile, settings: SearchSettings,
                       measured: dict[int, float]) -> np.ndarray:
    """``(heads,)`` multipliers (>= 1) of each head's costs: an ablated head whose measured
    loss per unit of first-order share (what the uniform rule drops on it) exceeds the median
    ablated head's is scaled up by the excess, at most ``_MAX_CORRECTION``.

    Only upward: an ablation prices one rule (the budget's uniform one), and a head that
    loses less there than first order says may still lose everything under a narrower rule,
    so its costs are left alone.  (Scaling every head to the measured loss, as before,
    discounted the heads a needle head outweighs by up to 100x, and the optimizer then cut
    them to the narrowest windows: validation KL 0.36 against 0.04 for streaming, on the
    second test bed at KV 0.5.)  The median makes the scale robust to the one head that
    carries a needle, which is what the correction is for."""
    factors = np.ones(profile.num_heads)
    share = profile.dropped_share(uniform_rule(settings.budget, settings.target_lengths))
    heads = np.array([h for h in sorted(measured) if share[h] > 0], dtype=np.int64)
    if heads.size < 2:
        return factors
    per_share = np.array([measured[h] for h in heads]) / share[heads]
    typical = float(np.median(per_share))
    if typical <= 0:
        return factors
    factors[heads] = np.clip(per_share / typical, 1.0, _MAX_CORRECTION)
    return factors


def protection_order(profile: Profile, settings: SearchSettings,
                     measured: dict[int, float]) -> list[int]:
    """Heads most worth keeping full, most important first: the ablated heads by measured
    loss, then the others by the share of influence the uniform rule drops on them."""
    share = profile.dropped_share(uniform_rule(settings.budget, settings.target_lengths))
    rest = [int(h) for h in np.argsort(-share, kind="stable") if int(h) not in measured]
    return sorted(measured, key=lambda h: -measured[h]) + rest


def _keep_counts(heads: int) -> list[int]:
    """How many heads the keep-full candidates keep: 1, 2, 4, ... up to a quarter of all."""
    counts, k = [], 1
    while k <= max(1, heads // 4):
        counts.append(k)
        k *= 2
    return counts


def plan_from_solution(choice: np.ndarray, profile: Profile, settings: SearchSettings
                       ) -> Plan:
    shape = profile.model
    rules = [settings.rule_space.rules[c] for c in choice]
    kv = shape.num_key_value_heads
    by_layer = [rules[i * kv:(i + 1) * kv] for i in range(shape.num_layers)]
    return Plan(model=shape, rules=by_layer, budget=settings.budget,
                lengths=settings.target_lengths)


def _top_heads_plan(profile: Profile, settings: SearchSettings, order: list[int],
                    count: int) -> Plan | None:
    """The first ``count`` heads of ``order`` full, every other head one uniform rule that
    spends the rest of the budget (None if nothing is left for them)."""
    heads = profile.num_heads
    rest = (settings.budget.value * heads - count) / (heads - count) if count < heads else 0
    if rest <= 0:
        return None
    try:
        rule = uniform_rule(Budget(settings.budget.kind, min(rest, 1.0)),
                            settings.target_lengths)
    except BudgetError:
        return None
    flat = [Rule.full_attention() if h in order[:count] else rule for h in range(heads)]
    kv = profile.model.num_key_value_heads
    return Plan(model=profile.model, rules=[flat[i:i + kv] for i in range(0, heads, kv)],
                budget=settings.budget, lengths=settings.target_lengths)


def candidate_plans(profile: Profile, settings: SearchSettings,
                    factors: np.ndarray, order: list[int]) -> list[tuple[str, Plan, bool]]:
    """``(name, plan, prunable)`` for every candidate, likeliest first, duplicates (the same
    rules) dropped, at most ``settings.candidates``.  The baselines are not prunable."""
    shape, budget, targets = profile.model, settings.budget, settings.target_lengths
    out: list[tuple[str, Plan, bool]] = []

    def add(name: str, plan: Plan | None, prunable: bool = True) -> None:
        if plan is not None and all(plan.rules != p.rules for _, p, _ in out):
            out.append((name, plan, prunable))

    corrected = knapsack(profile, settings, factors)
    kw = dict(time_limit=settings.time_limit)
    add("optimizer", plan_from_solution(solve(corrected, **kw).choice, profile, settings))
    try:
        duo = best_duo_plan(profile, budget, targets)
    except BudgetError:
        duo = None  # no room even for 64 sinks + 32 recent tokens at the shortest length
    add("duo", duo, False)
    full = [] if duo is None else [h for h, rule in enumerate(duo.flat_rules) if rule.full]
    if full:
        # Duo's full heads with the budget it leaves unspent (its fixed windows often leave
        # much: KV 0.17 of 0.3 on the reference model) given to the others' windows
        add("duo heads full, rest uniform", _top_heads_plan(profile, settings, full, len(full)))
    for k in _keep_counts(profile.num_heads):
        keep = corrected.with_keep_full(order[:k])
        add(f"optimizer, {k} kept full",
            plan_from_solution(solve(keep, **kw).choice, profile, settings))
        add(f"top {k} full, rest uniform", _top_heads_plan(profile, settings, order, k))
    add("streaming", uniform_plan(shape, budget, targets), False)
    if settings.ablate:
        first_order = knapsack(profile, settings)
        add("optimizer, first order",
            plan_from_solution(solve(first_order, **kw).choice, profile, settings))
    baselines = [c for c in out if not c[2]]
    others = [c for c in out if c[2]][:max(0, settings.candidates - len(baselines))]
    chosen = [c for c in out if c in baselines or c in others]
    if settings.attention_budget is None:
        return chosen
    return _with_query_spans(chosen, profile, settings, factors)


def _with_query_spans(candidates: list[tuple[str, Plan, bool]], profile: Profile,
                      settings: SearchSettings, factors: np.ndarray
                      ) -> list[tuple[str, Plan, bool]]:
    """Every candidate with its query heads' spans chosen under the attention budget (the
    costs corrected by the ablations' ``factors``, as the KV plan's), and the
    KV optimizer's and the streaming plan with every query head capped at one common window
    (the heuristic; on the streaming plan a baseline).
    A candidate that cannot meet the attention budget (its sinks alone exceed it) is left
    out."""
    budget = Budget("attention", settings.attention_budget)
    targets = settings.target_lengths
    out = []
    for name, plan, prunable in candidates:
        try:
            out.append((name, narrow_query_heads(plan, profile, settings.rule_space,
                                                 settings.lengths, targets, budget,
                                                 head_factors=factors,
                                                 time_limit=settings.time_limit), prunable))
        except BudgetError:
            continue
        if name in ("optimizer", "streaming"):  # and the heuristic, on plans that use it
            try:
                out.append((f"{name}, query heads capped",
                            cap_query_heads(plan, settings.rule_space, targets, budget),
                            prunable))
            except BudgetError:
                continue
    if not out:
        raise BudgetError(f"no candidate plan meets attention budget {budget.value:g}; raise "
                          "--attention-budget")
    return out


def _digest(plan: Plan) -> str:
    return hashlib.sha1(repr(plan.rules).encode()).hexdigest()


def _sample_digest(sample: Any) -> bytes:
    return hashlib.sha1(np.asarray(sample.input_ids.cpu(), dtype=np.int64).tobytes()).digest()


def check_disjoint(profiled: Samples, held_out: list[Any]) -> None:
    """Held-out samples must not be profiling samples (nor repeat each other)."""
    seen = {_sample_digest(s) for group in profiled.values() for s in group}
    mine = [_sample_digest(s) for s in held_out]
    if len(set(mine)) < len(mine) or seen & set(mine):
        raise DataError("the held-out samples overlap the profiling samples or repeat; give "
                        "more data, or fewer --samples / --validation-samples")


def _study_name(profile: Profile, settings: SearchSettings, held_out: list[Any]) -> str:
    digest = hashlib.sha1(b"".join(_sample_digest(s) for s in held_out))
    digest.update(repr((settings.ablate, settings.candidates, settings.rule_space.compensate,
                        settings.layer_max_density, settings.attention_budget)).encode())
    return (f"moaplan-{profile.model.fingerprint or 'model'}-{profile.data_hash}-"
            f"{settings.budget.kind}{settings.budget.value}-"
            f"{'-'.join(map(str, settings.target_lengths))}-{digest.hexdigest()[:12]}")


def shared_reference(model: torch.nn.Module, held_out: list[Any], local: Callable, *,
                     storage: str | None, study_name: str) -> DenseReference:
    """The dense reference on the held-out samples, one batch per trial of the study
    ``study_name`` in ``storage`` (:func:`~moaplan.optimize.measure`): workers that share the
    storage each run the dense model on some batches and take the others' from the study,
    where one worker alone would run them all (the same numbers: every batch is run as
    :class:`~moaplan.validation.DenseReference` runs it)."""
    units = batches(held_out)
    study = open_study(storage, study_name)

    def evaluate(index: int, report: Callable[[int, float], None]) -> tuple[float, dict]:
        # In the study's attributes, not the trial's: every look at the trials (several per
        # trial in measure) would load them all again, megabytes each.
        study.set_user_attr(f"batch {index}",
                            reference_part(model, held_out, units[index], local=local))
        return 0.0, {}

    measure([Candidate(f"samples {rows}", f"samples {rows}", prunable=False)
             for rows in units], evaluate, study=study)
    parts = study.user_attrs
    return DenseReference.from_parts(held_out, [(rows, parts[f"batch {i}"])
                                                for i, rows in enumerate(units)])


def search(model: torch.nn.Module, source: SampleSource, settings: SearchSettings, *,
           out: str | Path, profile_path: str | Path, storage: str | None,
           checkpointing: bool = False, on_sample: Callable | None = None,
           on_step: OnStep | None = None) -> SearchResult:
    """Run the whole search and write the plan to ``out`` (atomically); ``checkpointing``:
    profile with gradient checkpointing (:class:`moaplan.profile.layout.Layout` says when)."""
    start = time.perf_counter()
    check_budget(settings)
    samples = {n: source(n, settings.samples, False) for n in settings.lengths}
    # The validation lengths alternate, so every step of a running score sees them all.
    by_length = [source(n, count, True) for n, count in settings.validation_counts().items()]
    held_out = [s for group in itertools.zip_longest(*by_length) for s in group if s is not None]
    check_disjoint(samples, held_out)
    local = attend_locally(model, settings.target_lengths)
    # The profile is taken on the long-range response tokens: the rest would drown them.
    calibration = {n: DenseReference(model, group, local=local) for n, group in samples.items()}
    samples = {n: reference.focused() for n, reference in calibration.items()}
    with _profiling_lock(Path(profile_path)):
        profile = obtain_profile(model, samples, Path(profile_path), block=settings.block,
                                 rule_space=settings.rule_space, objective=settings.objective,
                                 gradient_checkpointing=checkpointing, on_sample=on_sample)
    if settings.attention_budget is not None:  # before the ablations, not after them
        profile.check_query_heads(str(profile_path))
    name = _study_name(profile, settings, held_out)
    # a resumed search finds the heads measured so far in the ablation study
    measured = ablate(model, profile, settings, calibration[max(settings.lengths)], on_step,
                      storage=storage, study_name=f"{name}-ablation")
    factors = correction_factors(profile, settings, measured)
    order = protection_order(profile, settings, measured)
    candidates = candidate_plans(profile, settings, factors, order)
    if on_step is not None:
        on_step("reference", 0, 1, "dense model on the held-out samples")
    reference = shared_reference(model, held_out, local, storage=storage,
                                 study_name=f"{name}-reference")
    forced = reference.forced()

    def evaluate(index: int, report: Callable[[int, float], None]) -> tuple[float, dict]:
        score = _scored(model, candidates[index][1], reference,
                        report=lambda step, running: report(step, running.mean_kl))
        return score.mean_kl, {"kl": list(score.kl), "match": list(score.match)}

    def measured_one(index: int, state: str, value: float) -> None:
        if on_step is not None:
            on_step("validate", index + 1, len(candidates),
                    f"{candidates[index][0]}: {state} {value:.4f}")

    # One study per candidate set: a resumed search whose candidates differ (another
    # moaplan version, another correction) measures them afresh instead of failing on the
    # stored trials' choices; the ablations and the dense reference above are kept.
    digests = [_digest(plan) for _, plan, _ in candidates]
    candidate_set = hashlib.sha1(''.join(digests).encode()).hexdigest()[:8]
    study = open_study(storage, f"{name}-{candidate_set}")
    study = measure([Candidate(c[0], digest, c[2]) for c, digest in zip(candidates, digests)],
                    evaluate, study=study, on_measured=measured_one)
    results = _measured(study, candidates, profile, factors)
    chosen = best_candidate(study)
    fo = [r.predicted for r in results if r.state == "complete"]
    corr = [r.corrected for r in results if r.state == "complete"]
    kl = [r.value for r in results if r.state == "complete"]
    agreement = {"first_order": rank_correlation(fo, kl), "corrected": rank_correlation(corr, kl)}
    name, plan, _ = candidates[chosen]
    best = results[chosen].score
    plan.provenance = {
        "profile": str(profile_path),
        "search": {
            "chosen": name,
            **({"attention_budget": settings.attention_budget}
               if settings.attention_budget is not None else {}),
            "validation": {"lengths": settings.validation_lengths, "samples": len(reference),
                           "answers_forced": forced,
                           "long_range_tokens": round(reference.long_range_share(), 4),
                           "kl": round(best.mean_kl, 6),
                           "kl_95": [round(best.kl_interval().low, 6),
                                     round(best.kl_interval().high, 6)],
                           "match": round(best.match_rate(), 4)},
            "candidates": {r.name: _record(r, results[chosen]) for r in results},
            "ablated_heads": {int(h): round(v, 6) for h, v in measured.items()},
            "predicted_vs_measured_spearman": {k: round(v, 4) for k, v in agreement.items()},
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
    save_plan(plan, out)
    return SearchResult(plan=plan, chosen=name, candidates=results, profile=profile,
                        ablation=measured, agreement=agreement, forced=forced)


def _record(result: Measured, chosen: Measured) -> dict[str, Any]:
    """A candidate in the plan's provenance: state, mean KL, corrected prediction and, when
    complete, the 95% interval of its KL minus the chosen candidate's (paired)."""
    record = {"state": result.state, "kl": round(result.value, 6),
              "corrected": round(result.corrected, 6)}
    if result.score is not None and chosen.score is not None:
        diff = result.score.paired_difference(chosen.score)
        record["vs_chosen_95"] = [round(diff.low, 6), round(diff.high, 6)]
    return record


def _measured(study, candidates: list[tuple[str, Plan, bool]], profile: Profile,
              factors: np.ndarray) -> list[Measured]:
    """Every candidate with its score (from this run or the study's stored trials)."""
    done = scores(study)
    out = []
    for index, (name, plan, _) in enumerate(candidates):
        state, value, attrs = done.get(index, ("not measured", float("nan"), {}))
        score = Score(tuple(attrs["kl"]), tuple(attrs["match"])) if "kl" in attrs else None
        share = profile.dropped_share(plan.flat_rules)
        out.append(Measured(name, plan, state, value, score, float(share.sum()),
                            float((share * factors).sum())))
    return out
