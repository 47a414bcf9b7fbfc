"""What the model-driven commands share: loading the model and its calibration data, the
default profile path, progress bars and the closing summary."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moaplan.errors import DataError
from moaplan.plan import ModelShape
from moaplan.plan.report import plan_table
from moaplan.search import SampleSource, SearchResult, SearchSettings

SEED = 0


@dataclass
class ModelSession:
    model: Any
    tokenizer: Any
    sample_source: SampleSource
    profile_path: Path

    @classmethod
    def open(cls, args: argparse.Namespace) -> ModelSession:
        from moaplan.data import load_calibration, model_calibration
        from moaplan.model import load_model

        model, tokenizer = load_model(args.model, device=args.device)
        if args.data:
            def source(length: int, count: int, held_out: bool) -> list:
                # Only samples that fill the length: a profile length is a real length.
                samples = [s for s in load_calibration(args.data, tokenizer, length, None)
                           if len(s.input_ids) == length]
                if len(samples) < count:
                    raise DataError(f"{args.data} has {len(samples)} samples of at least "
                                    f"{length} tokens, {count} are needed; give longer or more "
                                    "data, or shorter --lengths / fewer --samples")
                return samples[-count:] if held_out else samples[:count]
        else:
            def source(length: int, count: int, held_out: bool) -> list:
                return model_calibration(model, tokenizer, length, count,
                                             seed=SEED + int(held_out))
        shape = ModelShape.from_config(model.config)
        name = f"{shape.model_type or 'model'}-{shape.fingerprint}.safetensors"
        default = Path("profiles") / name
        return cls(model, tokenizer, source, Path(args.profile) if args.profile else default)

    @contextlib.contextmanager
    def progress(self, settings: SearchSettings) -> Iterator[_Progress]:
        bars = _Progress(settings)
        try:
            yield bars
        finally:
            bars.close()

    @staticmethod
    def summary(result: SearchResult, settings: SearchSettings) -> str:
        plan = result.plan
        dens = plan.densities(settings.target_lengths)
        lines = [f"{'length':>8}  {'kv density':>10}  {'attn density':>12}  "
                 f"{'predicted dropped':>17}  {'measured loss':>22}"]
        for i, n in enumerate(settings.target_lengths):
            predicted = plan.predicted_loss.get(n)
            measured = (f"{result.plan_loss:.4f} (dense {result.dense_loss:.4f})"
                        if n == settings.validation_length else "-")
            lines.append(f"{n:>8}  {dens['kv'][..., i].mean():>10.3f}  "
                         f"{dens['attention'][..., i].mean():>12.3f}  "
                         f"{'-' if predicted is None else f'{predicted:.4f}':>17}  "
                         f"{measured:>22}")
        solver = (f"solver: {result.solution.status}, gap {result.solution.gap:.2%}, "
                  f"{result.solution.seconds:.1f} s; {result.trials} plans measured")
        return "\n".join(lines + ["", solver, "", plan_table(plan, [max(settings.target_lengths)])])


class _Progress:
    """tqdm bars for the profile (samples x lengths, tokens/s) and the validation trials,
    each opened on its first update (a reused profile shows no profile bar)."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self.profile_bar: tqdm | None = None
        self.trial_bar: tqdm | None = None
        self.tokens = 0
        self.seconds = 0.0

    def sample(self, progress: Any) -> None:
        if self.profile_bar is None:
            total = self.settings.samples * len(self.settings.lengths)
            self.profile_bar = tqdm(total=total, desc="profile", unit="sample")
        self.tokens += progress.tokens
        self.seconds += progress.seconds
        self.profile_bar.set_postfix(length=progress.length,
                                     tok_s=f"{self.tokens / max(self.seconds, 1e-9):.0f}")
        self.profile_bar.update()

    def trial(self, loss: float) -> None:
        if self.trial_bar is None:
            if self.profile_bar is not None:
                self.profile_bar.close()
            self.trial_bar = tqdm(total=self.settings.trials, desc="validate", unit="plan")
        self.trial_bar.set_postfix(loss=f"{loss:.4f}")
        self.trial_bar.update()

    def close(self) -> None:
        for bar in (self.profile_bar, self.trial_bar):
            if bar is not None:
                bar.close()
