"""Quality benchmark: how much of a dense model's behaviour each plan keeps, on a test bed.

Test beds (``--testbed``):

- ``reference``: the shipped reference model (8 layers x 8 query / 4 KV heads, head_dim 32),
  evaluated in the task wording it was trained on;
- ``second``: ``benchmarks/models/second`` (6 layers x 4 query / 2 KV heads, head_dim 64),
  trained by ``python -m moaplan.training.train --second`` on its own wording ("record"), which
  the default calibration data never uses;
- ``smollm2``: SmolLM2-135M-Instruct, a real pretrained model (30 layers x 9 query / 3 KV
  heads, head_dim 64), from its GGUF file (``make smollm2`` fetches it); a weak long-range
  retriever, so judge plans on it by what they keep of dense behaviour.

Methods at each KV budget: ``streaming`` (the same elastic sink + window for every head),
``duo`` (DuoAttention-style: the heads whose sink + recent rule drops the most influence keep
full attention, the best recent window of 256 ... 32), ``searched`` (``moaplan search`` with
its defaults) and ``first order`` (the optimizer's plan from the uncorrected profile, one of
the search's candidates).  One profile serves every method.

Measured per plan on the same samples (paired): passkey and key-value retrieval accuracy over
length x depth (``--samples`` per cell and task), perplexity and KL to dense on held-out
text, and the search's validation score (mean KL to dense on its held-out samples).  Writes
``quality-<testbed>.json`` and ``.md`` to ``--out``.

    python benchmarks/bench_quality.py --testbed reference [--quick] [--out benchmarks/results/cpu]
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
from quality_report import markdown
from tqdm import tqdm

from moaplan.data import CalibrationSample, stdlib_corpus
from moaplan.data.calibration import sample_source
from moaplan.data.tasks import CALIBRATION_PHRASINGS
from moaplan.data.tokens import text_row
from moaplan.errors import MoaplanError
from moaplan.eval import perplexity, retrieval_accuracy
from moaplan.io import atomic_write_text
from moaplan.model import load_model
from moaplan.plan import Budget, ModelShape, Plan, best_duo_plan, uniform_plan
from moaplan.runtime import apply, remove
from moaplan.search import SearchSettings, attend_locally, search
from moaplan.validation import DenseReference

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Testbed:
    name: str
    model: str | None  # a model directory or .gguf file (None: the shipped reference model)
    phrasing: str  # the task wording the model answers (moaplan.data.tasks.PHRASINGS)
    lengths: tuple[int, ...]  # retrieval grid, profiled lengths
    validation_length: int  # the search's unprofiled validation length


TESTBEDS = {
    "reference": Testbed("reference", None, "reference", (1024, 2048, 4096), 3072),
    "second": Testbed("second", str(REPO / "benchmarks/models/second"), "record",
                      (1024, 2048, 4096), 3072),
    # Dense SmolLM2 retrieves little past 2K tokens: profile and judge it where it works.
    "smollm2": Testbed("smollm2", str(REPO / "build/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                       "longlora", (1024, 2048), 1536),
}


@dataclass(frozen=True)
class QualitySettings:
    budgets: tuple[float, ...] = (0.5, 0.3, 0.2)
    # Depth 1 (the needle just before the question) is left out: every plan's window sees it.
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    samples: int = 16  # per (length, depth) cell and task
    text_windows: int = 8  # held-out text windows at the longest length (ppl and KL)
    sink: int = 64
    recent: int = 256  # the longest recent window of Duo streaming heads (see best_duo_plan)
    batch_size: int = 8
    seed: int = 0
    search: SearchSettings | None = None  # None: moaplan search's defaults, per test bed
    lengths: tuple[int, ...] | None = None  # None: the test bed's
    # Calibrate in the test bed's own task wording (what a user's JSONL in their model's format
    # gives) instead of the default wordings.
    own_wording: bool = False


QUICK = QualitySettings(budgets=(0.5,), depths=(0.0,), samples=2, text_windows=1,
                        lengths=(512,))


def load_testbed(testbed: Testbed, device: str):
    """The test bed's model (float32 on the CPU, bfloat16 on a GPU) and tokenizer."""
    if testbed.model is not None and not Path(testbed.model).exists():
        raise MoaplanError(f"no model at {testbed.model}; run `make smollm2` first")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return load_model(testbed.model, dtype=dtype, device=device)


def text_samples(tokenizer, length: int, count: int, seed: int) -> list[CalibrationSample]:
    """Held-out text windows; every token after the first 64 is scored."""
    corpus = stdlib_corpus("heldout")
    rng = np.random.default_rng([seed, length, 7])
    out = []
    for _ in range(count):
        ids = torch.tensor(text_row(tokenizer, corpus, length, rng))
        mask = torch.zeros(length, dtype=torch.bool)
        mask[64:] = True
        out.append(CalibrationSample(ids, mask))
    return out


def run(testbed: Testbed, settings: QualitySettings, out: Path, work: Path,
        device: str) -> dict[str, Any]:
    """Every method at every budget; results are written after each plan."""
    started = time.perf_counter()
    name = testbed.name + ("-own-wording" if settings.own_wording else "")
    model, tokenizer = load_testbed(testbed, device)
    shape = ModelShape.from_config(model.config)
    lengths = list(settings.lengths or testbed.lengths)
    validation_length = (testbed.validation_length if settings.lengths is None
                         else lengths[-1] * 3 // 4)

    source = functools.cache(sample_source(
        model, tokenizer, None, lengths, settings.seed,
        (testbed.phrasing,) if settings.own_wording else CALIBRATION_PHRASINGS))

    def search_settings(budget: float) -> SearchSettings:
        base = settings.search or SearchSettings(budget=Budget("kv", budget), lengths=lengths,
                                                 validation_length=validation_length)
        return replace(base, budget=Budget("kv", budget))

    probe = search_settings(settings.budgets[0])
    # the search's own validation: the same held-out samples, scored the same way
    held_out = [s for n, c in probe.validation_counts().items() for s in source(n, c, True)]
    validation = DenseReference(model, held_out,
                                local=attend_locally(model, probe.target_lengths))
    text = text_samples(tokenizer, max(lengths), settings.text_windows, settings.seed)
    text_reference = DenseReference(model, text)
    targets = sorted({*probe.target_lengths, *lengths})
    report: dict[str, Any] = {"meta": provenance() | {
        "testbed": asdict(testbed), "device": device,
        "settings": asdict(replace(settings, search=None)) | {
            "lengths": lengths, "validation_length": validation_length,
            "validation_lengths": probe.validation_lengths,
            "validation_samples": len(validation), "profile_samples": probe.samples,
            "candidates": probe.candidates, "ablate": probe.ablate,
            "target_lengths": targets}},
        "methods": [], "searches": []}
    grid = dict(lengths=lengths, depths=settings.depths, samples=settings.samples,
                seed=settings.seed, batch_size=settings.batch_size, phrasing=testbed.phrasing)
    bar = tqdm(total=1 + 4 * len(settings.budgets), desc=f"quality {testbed.name}", unit="plan")

    def record(method: str, budget: float | None, plan: Plan | None, **notes: Any) -> None:
        t0 = time.perf_counter()
        if plan is not None:
            apply(model, plan)
        try:
            result = {
                "method": method, "budget": budget,
                "kv_density": {n: 1.0 if plan is None else
                               float(plan.densities([n])["kv"].mean()) for n in lengths},
                "attention_density": {n: 1.0 if plan is None else
                                      float(plan.densities([n])["attention"].mean())
                                      for n in lengths},
                "passkey": retrieval_accuracy("passkey", model, tokenizer, **grid).to_dict(),
                "kv": retrieval_accuracy("kv", model, tokenizer, **grid).to_dict(),
                "perplexity": perplexity(model, tokenizer, lengths=[max(lengths)],
                                         samples=settings.text_windows, seed=settings.seed,
                                         batch_size=settings.batch_size).to_dict(),
                "text_kl": list(text_reference.score(model).kl),
                "validation_kl": list(validation.score(model).kl),
            }
        finally:
            if plan is not None:
                remove(model)
        result.update(seconds=round(time.perf_counter() - t0, 1), notes=notes)
        report["methods"].append(result)
        report["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        write(report, out, name)
        bar.set_postfix(last=f"{method} {budget or ''}")
        bar.update()

    profile_path = work / f"profile-{testbed.name}-{shape.fingerprint}.safetensors"
    try:
        record("dense", None, None)
        profile_path.unlink(missing_ok=True)  # one fresh profile per run, shared below
        for value in settings.budgets:
            budget = Budget("kv", value)
            t0 = time.perf_counter()
            # The first search makes the profile (on its long-range tokens); the others and
            # the Duo baseline reuse it.
            found = search(model, source, replace(search_settings(value), extend_to=targets),
                           out=work / f"plan-{testbed.name}-kv{value}.yaml",
                           profile_path=profile_path, storage=None)
            seconds = round(time.perf_counter() - t0, 1)
            report["searches"].append({
                "budget": value, "seconds": seconds, "chosen": found.chosen,
                "agreement": found.agreement, "ablation": found.ablation,
                "candidates": [{"name": c.name, "state": c.state, "kl": c.value,
                                "predicted": c.predicted, "corrected": c.corrected}
                               for c in found.candidates]})
            record("streaming", value, uniform_plan(shape, budget, targets, settings.sink))
            duo = best_duo_plan(found.profile, budget, targets, settings.sink, settings.recent)
            record("duo", value, duo, full_heads=duo.provenance["full_heads"],
                   recent=duo.provenance["recent"])
            record("searched", value, found.plan, chosen=found.chosen, search_seconds=seconds,
                   rules=sorted({r.describe() for r in found.plan.flat_rules}))
            first = next((c for c in found.candidates if c.name == "optimizer, first order"),
                         None)
            if first is not None:
                record("first order", value, first.plan)
    finally:
        bar.close()
    return report


def write(report: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"quality-{name}.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / f"quality-{name}.md", markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), nargs="+",
                        default=["reference", "second"],
                        help="test beds to run (default: the two shipped models)")
    parser.add_argument("--quick", action="store_true",
                        help="one budget, one length, one depth: a smoke test")
    parser.add_argument("--budgets", type=float, nargs="+", help="override the KV budgets")
    parser.add_argument("--samples", type=int, help="override the samples per cell and task")
    parser.add_argument("--own-wording", action="store_true",
                        help="calibrate in the test bed's own task wording (as a user's data in "
                             "their model's format would), not the default wordings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--work", type=Path,
                        help="profiles and plans (default build/bench-quality[-quick])")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device of the model (default: cuda when there is one)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else QualitySettings()
    if args.quick:
        settings = replace(settings, search=SearchSettings(
            budget=Budget("kv", 0.5), lengths=[512], validation_length=384, samples=2,
            validation_samples=4, candidates=4, ablate=2))
    overrides = {"budgets": args.budgets and tuple(args.budgets), "samples": args.samples,
                 "own_wording": args.own_wording}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v})
    work = args.work or Path("build/bench-quality-quick" if args.quick else "build/bench-quality")
    work.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar reports plans
    for name in args.testbed:
        try:
            report = run(TESTBEDS[name], settings, args.out, work, args.device)
        except MoaplanError as err:
            print(f"bench_quality: {name}: {err}", file=sys.stderr)
            return 1
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
