"""Quality benchmark on the reference model: how much retrieval accuracy a plan keeps.

Methods, each at KV budgets 0.5, 0.3 and 0.2 (dense once): a uniform StreamingLLM-style
plan (``uniform_plan``: the same elastic sink + window for every head); a DuoAttention-style
plan (``duo_plan``: the heads whose 64-sink + 256-recent rule drops the most influence at the
longest profiled length keep full attention, the rest that rule); the plan ``search`` finds
(MoA-style elastic rules per head).  One profile serves the Duo scores and every search.
At the budgets in ``comp_budgets`` (0.3 and 0.2), the uniform and the searched plans are also
measured with RazorAttention's compensation token on every non-full head ("uniform +comp",
"searched +comp"): the same rules, so their KV density is one key per head higher (at most
1/N above the budget).

Every plan meets its budget at every length it is evaluated at.  For each method: passkey
and key-value retrieval accuracy over length x depth, perplexity on held-out text, and KV /
attention density per length.  Writes ``quality.json`` and ``quality.md`` to ``--out``.

    python benchmarks/bench_quality.py [--quick] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from provenance import provenance
from quality_report import COMP_METHODS, METHODS, MethodResult, markdown
from tqdm import tqdm

from moaplan.errors import BudgetError, MoaplanError
from moaplan.eval import kv_accuracy, passkey_accuracy, perplexity
from moaplan.io import atomic_write_text
from moaplan.plan import Budget, ModelShape, Plan, duo_plan, uniform_plan
from moaplan.rules import RuleSpace
from moaplan.runtime import apply, remove
from moaplan.search import SearchSettings, measured_loss, obtain_profile, search


@dataclass(frozen=True)
class QualitySettings:
    """What the benchmark measures.  The plans' attention runs on the CPU through the runtime's
    exact reference path (about 10x a dense SDPA forward), so retrieval is scored on a small
    grid: the defaults took 31 minutes on 2 CPU cores (AMD EPYC, 2026-11-25) before the
    four +comp rows were added (expect about a quarter more)."""

    budgets: tuple[float, ...] = (0.5, 0.3, 0.2)
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # retrieval grid
    # Depth 1 (the needle just before the question) is left out: every plan's window sees it.
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    samples: int = 2  # per (length, depth) cell and task
    ppl_lengths: tuple[int, ...] = (1024, 4096)
    ppl_samples: int = 1
    profile_lengths: tuple[int, ...] = (1024, 2048, 4096)
    validation_length: int = 3072
    # The search runs with `moaplan search`'s defaults.
    profile_samples: int = 4
    validation_samples: int = 2
    trials: int = 8
    sink: int = 64
    recent: int = 256  # the longest recent window of Duo streaming heads (see duo_baseline)
    batch_size: int = 4
    seed: int = 0
    comp_budgets: tuple[float, ...] = (0.3, 0.2)  # where compensation tokens are measured too

    @property
    def target_lengths(self) -> list[int]:
        """Every length a plan must meet its budget at: profiled, validated and evaluated."""
        return sorted({*self.profile_lengths, self.validation_length, *self.lengths,
                       *self.ppl_lengths})


QUICK = QualitySettings(budgets=(0.5,), lengths=(512,), depths=(0.0,), samples=1,
                        ppl_lengths=(512,), ppl_samples=1, profile_lengths=(256,),
                        validation_length=384, profile_samples=1, trials=1)


def evaluate(model, tokenizer, plan: Plan | None, settings: QualitySettings,
             held_out: list) -> dict[str, Any]:
    """Retrieval, perplexity and the loss the search validates by (response-token loss on
    ``held_out``) of ``model`` under ``plan`` (None: dense)."""
    grid = dict(lengths=settings.lengths, depths=settings.depths, samples=settings.samples,
                seed=settings.seed, batch_size=settings.batch_size)
    if plan is not None:
        apply(model, plan)
    try:
        return {
            "passkey": passkey_accuracy(model, tokenizer, **grid).to_dict(),
            "kv": kv_accuracy(model, tokenizer, **grid).to_dict(),
            "perplexity": perplexity(model, tokenizer, lengths=settings.ppl_lengths,
                                     samples=settings.ppl_samples, seed=settings.seed,
                                     batch_size=settings.batch_size).to_dict(),
            "validation_loss": measured_loss(model, held_out),
        }
    finally:
        if plan is not None:
            remove(model)


def with_compensation(plan: Plan) -> Plan:
    """The same plan with a compensation token on every non-full head."""
    rules = [[r if r.full else replace(r, compensate=True) for r in layer] for layer in plan.rules]
    return replace(plan, rules=rules, provenance={**plan.provenance, "compensate": True})


def densities(plan: Plan | None, lengths: list[int]) -> dict[str, dict[int, float]]:
    if plan is None:
        return {"kv_density": dict.fromkeys(lengths, 1.0),
                "attention_density": dict.fromkeys(lengths, 1.0)}
    dens = plan.densities(lengths)
    return {f"{kind}_density": {n: float(dens[kind][..., i].mean()) for i, n in enumerate(lengths)}
            for kind in ("kv", "attention")}


def predicted_dropped(profile, plan: Plan) -> float:
    """The optimizer's objective for any plan: the dropped influence of its rules summed over
    the profiled lengths, each length normalised by the total influence."""
    rules = plan.flat_rules
    unique = list(dict.fromkeys(rules))
    column = [unique.index(r) for r in rules]
    cost = 0.0
    for n in profile.lengths:
        dropped = profile.dropped_influence(unique, n)[np.arange(len(rules)), column]
        cost += float(dropped.sum() / profile.total(n).sum())
    return cost


def duo_baseline(shape: ModelShape, profile, budget: Budget, settings: QualitySettings) -> Plan:
    """The best DuoAttention-style plan: heads scored like ``moaplan baseline duo`` (the
    influence their sink + recent rule drops at the longest profiled length), trying the
    recent windows ``recent``, ``recent / 2``, ... 32 and keeping the feasible plan with the
    least predicted dropped influence.  A shorter window leaves room for more full heads, and
    at low budgets 64 + 256 keys do not fit at 1K at all (KV density 0.31)."""
    candidates = []
    recent = settings.recent
    while recent >= 32:
        try:
            plan = duo_plan(shape, profile.duo_scores(settings.sink, recent), budget,
                            settings.target_lengths, settings.sink, recent)
        except BudgetError:
            recent //= 2
            continue
        plan.provenance.update(recent=recent, predicted=predicted_dropped(profile, plan))
        candidates.append(plan)
        recent //= 2
    if not candidates:
        raise BudgetError(f"no DuoAttention-style plan with {settings.sink} sinks meets KV "
                          f"budget {budget.value} at lengths {settings.target_lengths}")
    return min(candidates, key=lambda p: p.provenance["predicted"])


def run(settings: QualitySettings, out: Path, work: Path, device: str = "cpu") -> dict[str, Any]:
    """Every method at every budget on ``device``; results are written after each method, so
    a run cut short still leaves what it measured."""
    from moaplan.data import model_calibration
    from moaplan.model import load_model

    started = time.perf_counter()
    model, tokenizer = load_model(device=device)
    shape = ModelShape.from_config(model.config)
    lengths = sorted({*settings.lengths, *settings.ppl_lengths})

    @functools.cache
    def source(length: int, count: int, held_out: bool) -> list:
        # Generated by the dense model, as `moaplan search` does; cached so that every
        # search sees the very samples the shared profile was made from.
        return model_calibration(model, tokenizer, length, count,
                                     seed=settings.seed + int(held_out))

    def search_settings(budget: float) -> SearchSettings:
        extra = [n for n in settings.target_lengths
                 if n not in settings.profile_lengths and n != settings.validation_length]
        return SearchSettings(budget=Budget("kv", budget), lengths=list(settings.profile_lengths),
                              validation_length=settings.validation_length, extend_to=extra,
                              samples=settings.profile_samples,
                              validation_samples=settings.validation_samples,
                              trials=settings.trials, seed=settings.seed)

    described = asdict(settings) | {"target_lengths": settings.target_lengths}
    report: dict[str, Any] = {"meta": provenance() | {"settings": described, "device": device},
                              "methods": []}

    def record(method: str, budget: float | None, plan: Plan | None, **notes: Any) -> None:
        t0 = time.perf_counter()
        held_out = source(settings.validation_length, settings.validation_samples, True)
        scores = evaluate(model, tokenizer, plan, settings, held_out)
        result = MethodResult(method=method, budget=budget, **densities(plan, lengths), **scores,
                              seconds=round(time.perf_counter() - t0, 1), notes=notes)
        report["methods"].append(asdict(result))
        report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        write(report, out)
        bar.set_postfix(last=f"{method} {budget or ''}", retrieval=f"{result.retrieval:.2f}")
        bar.update()

    profile_path = work / f"profile-{shape.fingerprint}.safetensors"
    compensated = [b for b in settings.budgets if b in settings.comp_budgets]
    bar = tqdm(total=1 + len(METHODS) * len(settings.budgets) + len(COMP_METHODS)
               * len(compensated), desc="quality", unit="plan")
    try:
        record("dense", None, None)
        samples = {n: source(n, settings.profile_samples, False)
                   for n in settings.profile_lengths}
        profile_path.unlink(missing_ok=True)  # one fresh profile per run, shared below
        t0 = time.perf_counter()
        profile = obtain_profile(model, samples, profile_path, block=64, rule_space=RuleSpace())
        report["meta"]["profile_seconds"] = round(time.perf_counter() - t0, 1)
        for value in settings.budgets:
            budget = Budget("kv", value)
            uniform = uniform_plan(shape, budget, settings.target_lengths, settings.sink)
            record("streaming", value, uniform)
            if value in compensated:
                record("uniform +comp", value, with_compensation(uniform))
            duo = duo_baseline(shape, profile, budget, settings)
            record("duo", value, duo, full_heads=duo.provenance["full_heads"],
                   recent=duo.provenance["recent"], predicted=duo.provenance["predicted"])
            t0 = time.perf_counter()
            found = search(model, source, search_settings(value),
                           out=work / f"plan-kv{value}.yaml", profile_path=profile_path,
                           storage=None)
            record("searched", value, found.plan, search_seconds=round(time.perf_counter() - t0, 1),
                   solver_gap=float(found.solution.gap), trials=found.trials,
                   predicted=predicted_dropped(profile, found.plan),
                   rules=sorted({r.describe() for r in found.plan.flat_rules}))
            if value in compensated:
                record("searched +comp", value, with_compensation(found.plan))
    finally:
        bar.close()
    return report


def write(report: dict[str, Any], out: Path) -> None:
    atomic_write_text(out / "quality.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "quality.md", markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one budget, one length, one depth: a smoke test (< 1 min)")
    parser.add_argument("--budgets", type=float, nargs="+", help="override the KV budgets")
    parser.add_argument("--depths", type=float, nargs="+", help="override the needle depths")
    parser.add_argument("--samples", type=int, help="override the samples per cell and task")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--work", type=Path,
                        help="profile and plans (default build/bench-quality[-quick])")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device of the model (default: cuda when there is one)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else QualitySettings()
    overrides = {"budgets": args.budgets and tuple(args.budgets),
                 "depths": args.depths and tuple(args.depths), "samples": args.samples}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v})
    work = args.work or Path("build/bench-quality-quick" if args.quick else "build/bench-quality")
    work.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports plans
    try:
        report = run(settings, args.out, work, args.device)
    except MoaplanError as err:
        print(f"bench_quality: {err}", file=sys.stderr)
        return 1
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
