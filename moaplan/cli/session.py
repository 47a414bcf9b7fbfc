"""What the model-driven commands share: loading the model and its calibration data, the
profile path (:func:`moaplan.profile.record.default_profile_path` unless given), progress bars
and the closing summary."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moaplan.cli.common import ConfigCheck, TokenRate
from moaplan.plan.report import plan_table
from moaplan.profile.layout import Layout
from moaplan.profile.record import default_profile_path
from moaplan.search import SampleSource, SearchResult, SearchSettings
from moaplan.shape import ModelShape

SEED = 0


@dataclass
class ModelSession:
    model: Any
    tokenizer: Any
    sample_source: SampleSource
    profile_path: Path
    layout: Layout

    @classmethod
    def open(cls, args: argparse.Namespace, checks: ConfigCheck | None = None) -> ModelSession:
        """``--model`` (on one device or placed over several GPUs, as the profiler needs it),
        its tokenizer, the sample source and the profile path; ``checks`` run on the model's
        config before its weights load (:func:`moaplan.cli.common.open_profiled_model`)."""
        from moaplan.cli.common import open_profiled_model
        from moaplan.data.calibration import sample_source

        model, tokenizer, layout = open_profiled_model(args, checks=checks)
        lengths = [*args.lengths, getattr(args, "validation_length", args.lengths[0])]
        source = sample_source(model, tokenizer, args.data, lengths, SEED)
        profile = (Path(args.profile) if args.profile
                   else default_profile_path(ModelShape.from_config(model.config)))
        return cls(model, tokenizer, source, profile, layout)

    @contextlib.contextmanager
    def progress(self, settings: SearchSettings) -> Iterator[_Progress]:
        bars = _Progress(settings)
        try:
            yield bars
        finally:
            bars.close()


def search_summary(result: SearchResult, settings: SearchSettings) -> str:
    """The closing report of ``moaplan search``: every candidate's validation score (mean
    KL to dense with its 95% interval, match rate, paired difference to the chosen plan),
    predictions, and the chosen plan's densities and rules."""
    longest = max(settings.target_lengths)
    chosen = next(c for c in result.candidates if c.name == result.chosen)
    lines = [f"{'candidate':<30} {'KV dens.':>8} {'attn dens.':>10} {'KL to dense [95% CI]':>26} "
             f"{'match':>6} {'vs chosen [95% CI]':>28} {'predicted':>9} {'corrected':>9}"]
    for c in result.candidates:
        dens = c.plan.densities([longest])
        if c.score is not None:
            kl = str(c.score.kl_interval())
            match = f"{c.score.match_rate():.2f}"
            diff = ("(chosen)" if c is chosen else str(c.score.paired_difference(chosen.score)))
        else:
            kl, match, diff = f"{c.state} at {c.value:.4f}", "-", "-"
        lines.append(f"{c.name:<30} {dens['kv'].mean():>8.3f} {dens['attention'].mean():>10.3f} "
                     f"{kl:>26} {match:>6} {diff:>28} {c.predicted:>9.4f} {c.corrected:>9.4f}")
    n = len(chosen.score.kl)
    forced = (f" ({result.forced} tasks the dense model missed, scored on their own answer)"
              if result.forced else "")
    lines += [
        "",
        f"validation: {n} held-out samples{forced} at lengths "
        f"{', '.join(map(str, settings.validation_lengths))}; KL(dense || plan) per response "
        f"token; densities at {longest}",
        "predicted vs measured rank correlation (Spearman, complete candidates): first order "
        f"{result.agreement['first_order']:.2f}, after the ablation correction "
        f"{result.agreement['corrected']:.2f}",
        f"chosen: {result.chosen}",
        "",
        plan_table(result.plan, [longest]),
    ]
    return "\n".join(lines)


class _Progress:
    """tqdm bars for the profile (samples x lengths, tokens/s), the ablations and the
    validation of the candidates, each opened on its first update (a reused profile shows
    no profile bar)."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.bars: dict[str, tqdm] = {}
        self.rate = TokenRate()

    def _bar(self, stage: str, total: int, unit: str) -> tqdm:
        if stage not in self.bars:
            for bar in self.bars.values():
                bar.close()
            self.bars[stage] = tqdm(total=total, desc=stage, unit=unit)
        return self.bars[stage]

    def sample(self, progress: Any) -> None:
        bar = self._bar("profile", self.settings.samples * len(self.settings.lengths), "sample")
        bar.set_postfix(**self.rate.add(progress))
        bar.update()

    def step(self, stage: str, done: int, total: int, note: str) -> None:
        bar = self._bar(stage, total, "plan" if stage == "validate" else "head")
        bar.set_postfix_str(note)
        bar.update(max(0, done - bar.n) if stage != "validate" else 1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
