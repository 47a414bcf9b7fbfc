"""Per-query-head prefill spans: what the search's choice keeps against the one-line heuristic.

On a test bed (see ``bench_quality.TESTBEDS``), ``moaplan search --budget KV
--attention-budget A`` runs once (its candidates each narrowed under ``A``), then its plans
are scored again on fresh held-out samples (a seed neither the profile nor the search's
validation used), all on the same samples, so every comparison is paired:

- ``optimizer``: the KV optimizer's plan, its query heads' spans chosen by the second
  knapsack (:mod:`moaplan.query_spans`);
- ``optimizer, query heads capped``: the same KV plan, every query head capped at one common
  window (the widest that meets ``A``): the heuristic;
- ``optimizer, KV only``: the same KV plan without query windows (the prefill it would cost
  without per-query-head spans);
- the same three for the streaming plan, and the search's chosen plan.

Mean KL(dense || plan) per response token per sample, with 95% t-intervals; a paired
difference is called only when its interval excludes 0, else "tie".  Writes
``query_spans-<testbed>.{json,md}`` to ``--out``.

    python benchmarks/bench_query_spans.py --testbed reference second --attention-budget 0.5
    make smollm2 && python benchmarks/bench_query_spans.py --testbed smollm2
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import torch
from bench_quality import TESTBEDS, load_testbed
from provenance import provenance

from moaplan.data.calibration import sample_source
from moaplan.errors import MoaplanError
from moaplan.io import atomic_write_text
from moaplan.plan import Budget, Plan
from moaplan.runtime import apply, remove
from moaplan.search import SearchSettings, attend_locally, search
from moaplan.validation import DenseReference, Interval, Score

# Pairs compared: (plan, against it).
PAIRS = [("optimizer", "optimizer, query heads capped"),
         ("optimizer", "streaming, query heads capped"),
         ("optimizer", "streaming"),
         ("optimizer", "optimizer, KV only"),
         ("streaming", "streaming, query heads capped")]


def kv_only(plan: Plan) -> Plan:
    """``plan`` without query windows: every query head on its KV head's span."""
    return replace(plan, rules=[[replace(r, query_windows=None) for r in layer]
                                for layer in plan.rules])


def verdict(diff: Interval) -> str:
    if diff.high < 0:
        return "better"
    if diff.low > 0:
        return "worse"
    return "tie"


def run(testbed: str, kv_budget: float, attention_budget: float, test_samples: int,
        work: Path, device: str, quick: bool = False) -> dict[str, Any]:
    """``quick``: one short length and a handful of samples, a smoke test."""
    started = time.perf_counter()
    bed = TESTBEDS[testbed]
    model, tokenizer = load_testbed(bed, device)
    lengths = [512] if quick else list(bed.lengths)

    source = functools.cache(sample_source(model, tokenizer, None, lengths))

    settings = SearchSettings(budget=Budget("kv", kv_budget), lengths=lengths,
                              validation_length=384 if quick else bed.validation_length,
                              attention_budget=attention_budget)
    if quick:
        settings = replace(settings, samples=2, validation_samples=4, candidates=4, ablate=2)
    work.mkdir(parents=True, exist_ok=True)
    profile = work / f"profile-{testbed}-query.safetensors"
    profile.unlink(missing_ok=True)  # a fresh profile per run (per query head)
    found = search(model, source, settings, out=work / f"plan-{testbed}-query.yaml",
                   profile_path=profile, storage=None)
    searched = round(time.perf_counter() - started, 1)
    plans = {c.name: c.plan for c in found.candidates}
    plans["optimizer, KV only"] = kv_only(plans["optimizer"])
    plans["streaming, KV only"] = kv_only(plans["streaming"])
    plans[f"chosen ({found.chosen})"] = found.plan

    # Fresh held-out samples (seed 7): neither profiled nor used to choose the plan.
    fresh = sample_source(model, tokenizer, None, lengths, seed=7)
    per_length = -(-test_samples // len(settings.validation_lengths))
    test = [s for n in settings.validation_lengths for s in fresh(n, per_length, True)]
    reference = DenseReference(model, test, local=attend_locally(model, settings.target_lengths))
    longest = max(settings.target_lengths)
    scores: dict[str, Score] = {}
    rows = []
    for name, plan in plans.items():
        apply(model, plan)
        try:
            scores[name] = reference.score(model)
        finally:
            remove(model)
        dens = plan.densities(settings.target_lengths)
        rows.append({"plan": name, "kl": list(scores[name].kl),
                     "kl_95": str(scores[name].kl_interval()),
                     "match": scores[name].match_rate(),
                     "kv_density": float(dens["kv"][..., -1].mean()),
                     "attention_density": {n: float(dens["attention"][..., i].mean())
                                           for i, n in enumerate(settings.target_lengths)},
                     "query_windows": sum(r.query_windows is not None
                                          for r in plan.flat_rules)})
    comparisons = []
    for a, b in PAIRS:
        diff = scores[a].paired_difference(scores[b])
        comparisons.append({"plan": a, "against": b, "difference": str(diff),
                            "verdict": verdict(diff)})
    return {"meta": provenance() | {
                "testbed": testbed, "device": device, "kv_budget": kv_budget,
                "attention_budget": attention_budget, "target_lengths": settings.target_lengths,
                "longest": longest, "test_samples": len(test), "search_seconds": searched,
                "seconds": round(time.perf_counter() - started, 1),
                "search_chosen": found.chosen, "quick": quick},
            "plans": rows, "comparisons": comparisons}


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [f"# Per-query-head spans on {meta['testbed']}: KV {meta['kv_budget']}, attention "
             f"{meta['attention_budget']}",
             "",
             f"{meta.get('date', '')} · commit `{meta.get('commit', '?')}` · "
             f"{meta.get('card') or meta.get('cpu', meta['device'])} · "
             f"{meta['test_samples']} fresh held-out samples at lengths "
             f"{meta['target_lengths'][0]}-{meta['longest']} (paired) · "
             f"search {meta['search_seconds']} s, chose `{meta['search_chosen']}`",
             "",
             "| plan | KV density | attention density (shortest / longest target) | "
             "groups with query windows | KL to dense [95% CI] | match |",
             "|---|---|---|---|---|---|"]
    for row in report["plans"]:
        attention = list(row["attention_density"].values())
        lines.append(f"| {row['plan']} | {row['kv_density']:.3f} | {attention[0]:.3f} / "
                     f"{attention[-1]:.3f} | {row['query_windows']} | {row['kl_95']} | "
                     f"{row['match']:.3f} |")
    lines += ["", "| plan | against | KL difference [95% CI] | verdict |", "|---|---|---|---|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['plan']} | {c['against']} | {c['difference']} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), nargs="+",
                        default=["reference", "second"])
    parser.add_argument("--budget", type=float, default=0.5, help="KV budget (0.5)")
    parser.add_argument("--attention-budget", type=float, default=0.5)
    parser.add_argument("--test-samples", type=int, default=96)
    parser.add_argument("--quick", action="store_true",
                        help="one length (512), a few samples: a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("build/bench-query-spans"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    for testbed in args.testbed:
        try:
            report = run(testbed, args.budget, args.attention_budget,
                         8 if args.quick else args.test_samples, args.work, args.device,
                         args.quick)
        except MoaplanError as err:
            print(f"bench_query_spans: {testbed}: {err}", file=sys.stderr)
            return 1
        name = f"query_spans-{testbed}" + ("-quick" if args.quick else "")
        atomic_write_text(args.out / f"{name}.json", json.dumps(report, indent=1))
        text = markdown(report)
        atomic_write_text(args.out / f"{name}.md", text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
