"""Head scorers on the reference model (CPU): do they agree, and does AttentionInfluence
find the samples that need retrieval?

1. **Overlap.**  Rankings of the 32 KV heads by gradient influence (a small profile:
   2 calibration samples at each length; a head's share of the influence a 64-sink +
   256-recent rule drops), by retrieval score (needle prompts), by echo and by induction score
   (repeated random tokens), and the model card's retrieval heads (answer mass on the needle
   >= ``RETRIEVAL_MASS`` in its heads map); pairwise top-K overlap for K = 3 (the card's
   count of retrieval heads) and K = 8.
2. **Influence AUC.**  16 samples needing long-range retrieval (passkey and key-value prompts
   in turn, the answer as response) and 16 of purely local text (held-out text windows, their
   last 64 tokens as response), half at each length; each scored by the relative increase of
   its response loss when the top-3 heads of a ranking keep only their 64 latest keys and 4
   sink tokens (``LOCAL_WINDOW``).  AUC = chance a retrieval sample outscores a text sample.

Writes ``scorers.json`` and ``scorers.md`` to ``--out``.

    python benchmarks/bench_scorers.py [--quick] [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from provenance import provenance
from tqdm import tqdm

from moaplan.data import CalibrationSample, model_calibration, stdlib_corpus
from moaplan.data.tasks import TASKS
from moaplan.data.tokens import text_row
from moaplan.eval.data_influence import LOCAL_WINDOW, auc, influence_scores, masked_heads_plan
from moaplan.io import atomic_write_text
from moaplan.model import load_model, reference_model_path
from moaplan.plan import ModelShape
from moaplan.profile.compare import overlap_markdown, overlaps, scorer_rankings, top_heads
from moaplan.training.card import RETRIEVAL_MASS


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...] = (1024, 2048)
    gradient_samples: int = 2  # calibration samples per length for the gradient profile
    scorer_samples: int = 4  # needle prompts / repeated sequences per length
    tops: tuple[int, ...] = (3, 8)
    influence_samples: int = 16  # per class (retrieval, text), split over the lengths
    masked_heads: int = 3
    response_tokens: int = 64  # of a text sample
    seed: int = 0


QUICK = Settings(lengths=(512,), gradient_samples=1, scorer_samples=1, influence_samples=4)


def card_retrieval_heads() -> np.ndarray:
    """The model card's heads map, as a ranking: needle mass where it marks a retrieval head."""
    summary = json.loads((reference_model_path() / "summary.json").read_text())
    needle = np.asarray(summary["cpu_report"]["heads_map"]["needle"])
    return np.where(needle >= RETRIEVAL_MASS, needle, 0.0)


def influence_data(tokenizer, settings: Settings) -> tuple[list, list]:
    """``(retrieval samples, text samples)`` of held-out filler, alternating the lengths."""
    corpus = stdlib_corpus("heldout")
    rng = np.random.default_rng(settings.seed)
    retrieval, text = [], []
    for i in range(settings.influence_samples):
        n = settings.lengths[i % len(settings.lengths)]
        task = TASKS[("passkey", "kv")[i % 2]](tokenizer, corpus, n, float(rng.uniform()), rng)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[task.answer_start:] = True
        retrieval.append(CalibrationSample(torch.tensor(task.input_ids), mask))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n - settings.response_tokens:] = True
        text.append(CalibrationSample(torch.tensor(text_row(tokenizer, corpus, n, rng)), mask))
    return retrieval, text


def run(settings: Settings, out: Path) -> dict:
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model()
    started = time.perf_counter()
    calibration = {n: model_calibration(model, tokenizer, n, settings.gradient_samples,
                                            settings.seed) for n in settings.lengths}
    total = len(settings.lengths) * (settings.gradient_samples + 2 * settings.scorer_samples)
    with tqdm(total=total, desc="scorers", unit="input") as bar:
        rankings = scorer_rankings(model, tokenizer, settings.lengths, settings.scorer_samples,
                                   gradient_samples=calibration, seed=settings.seed,
                                   on_sample=lambda progress: bar.update(1))
    rankings["model card"] = card_retrieval_heads()
    scoring_s = time.perf_counter() - started

    started = time.perf_counter()
    retrieval, text = influence_data(tokenizer, settings)
    shape = ModelShape.from_config(model.config)
    influence = {}
    for name in ("retrieval", "gradient"):
        heads = sorted(top_heads(rankings[name], settings.masked_heads))
        plan = masked_heads_plan(shape, heads, LOCAL_WINDOW)
        with tqdm(total=4 * settings.influence_samples, desc=f"influence ({name})",
                  unit="pass") as bar:
            scores = influence_scores(model, retrieval + text, plan,
                                      on_sample=lambda: bar.update(1))
        k = settings.influence_samples
        influence[name] = {
            "masked_heads": heads,
            "auc": auc([s.score for s in scores[:k]], [s.score for s in scores[k:]]),
            "retrieval": [asdict(s) for s in scores[:k]],
            "text": [asdict(s) for s in scores[k:]],
        }
    influence_s = time.perf_counter() - started
    report = {
        "meta": provenance(),
        "settings": asdict(settings),
        "rankings": {name: r.tolist() for name, r in rankings.items()},
        "overlaps": {k: [asdict(o) for o in overlaps(rankings, k)] for k in settings.tops},
        "influence": influence,
        "seconds": {"scoring": round(scoring_s, 1), "influence": round(influence_s, 1)},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scorers.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "scorers.md", markdown(report))
    return report


def _median(scores: list[dict], key: str) -> float:
    return float(np.median([s[key] for s in scores]))


def markdown(report: dict) -> str:
    s, meta = report["settings"], report["meta"]
    rankings = {name: np.asarray(r) for name, r in report["rankings"].items()}
    lines = [
        "# Head scorers on the reference model (CPU)",
        "",
        f"{meta['date']}, commit {meta['commit'][:10]}, {meta['cpu']}, torch {meta['torch']} "
        f"({meta['torch_threads']} threads).  Lengths {', '.join(map(str, s['lengths']))}; "
        f"gradient profile from {s['gradient_samples']} calibration samples per length, "
        f"retrieval / echo / induction from {s['scorer_samples']} inputs per length; "
        f"\"model card\" = the heads map's retrieval heads.  Scoring took "
        f"{report['seconds']['scoring']:.0f} s, influence {report['seconds']['influence']:.0f} s.",
    ]
    for k in s["tops"]:
        lines += ["", f"## Top-{k} overlap", "", overlap_markdown(rankings, k)]
    lines += [
        "",
        "## AttentionInfluence: retrieval samples vs local text",
        "",
        f"{s['influence_samples']} retrieval samples (passkey / key-value, answer as response) "
        f"and {s['influence_samples']} held-out text windows (last {s['response_tokens']} "
        f"tokens as response); score = (masked - dense) / dense response loss with the top-"
        f"{s['masked_heads']} heads of a ranking restricted to 4 sinks + their 64 latest keys.",
        "",
        "| heads masked | AUC | median score, retrieval | median score, text "
        "| median dense loss, retrieval / text |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["influence"].items():
        heads = ", ".join(f"({a}, {b})" for a, b in r["masked_heads"])
        lines.append(
            f"| top-{s['masked_heads']} {name}: {heads} | {r['auc']:.3f} "
            f"| {_median(r['retrieval'], 'score'):.3g} | {_median(r['text'], 'score'):.3g} "
            f"| {_median(r['retrieval'], 'dense_loss'):.3g} / "
            f"{_median(r['text'], 'dense_loss'):.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short length, few samples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    parser.add_argument("--influence-samples", type=int, help="override the samples per class")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.influence_samples:
        settings = replace(settings, influence_samples=args.influence_samples)
    report = run(settings, args.out)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
