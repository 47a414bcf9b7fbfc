"""How much of the dense model's behaviour a plan keeps, measured on held-out samples.

A plan is scored by the divergence of its next-token distributions from the dense model's on
the response tokens of held-out samples (whose responses the dense model wrote itself):
``KL(dense || plan)``.  Unlike the response loss, it does not saturate: a plan that keeps a
retrieved answer still pays for every bit of confidence it loses, and a plan can never score
better than dense.  Beside it, the *match* rate: the share of samples where at every
response position the plan's top token is the dense model's, i.e. greedy decoding would
write the dense model's answer.

Most tokens are predicted as well from the last few hundred tokens as from the whole
context; a plain mean over them hides the few that need the far context, which is exactly
what a sparse plan can lose (LongPPL's observation, Fang et al. 2024).  So the response
tokens are split once, with the dense model under a *local* plan (every head sees 64 sink
tokens and the last 256): a token is *long-range* when the dense model predicts it at least
``LONG_RANGE_GAIN`` nats better with the whole context.  A sample's score is the mean of
its long-range tokens' KL and its other tokens' KL (whichever it has).  A task the dense
model missed carries the task's own answer, teacher-forced
(:attr:`~moaplan.data.CalibrationSample.answered`); its score is its long-range tokens' KL
alone, since its other tokens only show how each plan perturbs a guess.

The dense distributions are measured once and kept as their ``top_k`` most likely tokens
plus one bucket for the rest; the KL is that of the two distributions coarsened to those
``top_k + 1`` outcomes (a lower bound of the full KL, exact for small vocabularies).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from moaplan.data import CalibrationSample
from moaplan.errors import DataError
from moaplan.profile.profiler import Sample

TOP_K = 256
BATCH = 4
LONG_RANGE_GAIN = 1.0  # nats of log-probability the whole context adds to a long-range token


@dataclass(frozen=True)
class Interval:
    """A mean over samples with its 95% t-interval."""

    mean: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        x = np.asarray(values, dtype=np.float64)
        if x.size < 2 or not np.ptp(x):
            return cls(float(x.mean()), float(x.mean()), float(x.mean()), int(x.size))
        half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
        return cls(float(x.mean()), float(x.mean() - half), float(x.mean() + half), int(x.size))

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Score:
    """One plan on the held-out samples: per-sample KL and match, in sample order."""

    kl: tuple[float, ...]
    match: tuple[bool, ...]

    @property
    def mean_kl(self) -> float:
        return float(np.mean(self.kl))

    def kl_interval(self) -> Interval:
        return Interval.of(self.kl)

    def match_rate(self) -> float:
        return float(np.mean(self.match))

    def paired_difference(self, other: Score) -> Interval:
        """``self.kl - other.kl`` per sample, with its 95% interval (same samples)."""
        if len(self.kl) != len(other.kl):
            raise ValueError("paired comparison of scores on different sample counts")
        return Interval.of(np.subtract(self.kl, other.kl))


@dataclass
class _Reference:
    positions: torch.Tensor  # [T] positions t whose next token t + 1 is a response token
    targets: torch.Tensor  # [T] the dense model's tokens there
    top_ids: torch.Tensor  # [T, k] the dense model's most likely tokens
    top_logp: torch.Tensor  # [T, k + 1] their log-probabilities, then the rest's
    long_range: torch.Tensor  # [T] bool: the token needs the far context
    forced: bool  # the response is a missed task's answer, teacher-forced

    def sample_score(self, kl: torch.Tensor) -> float:
        """The mean of the long-range tokens' KL and the other tokens' KL; for a forced
        answer, the long-range tokens' alone (a forced answer without any is never scored:
        :meth:`DenseReference._keep`)."""
        if self.forced:
            return float(kl[self.long_range].mean())
        parts = [kl[m].mean() for m in (self.long_range, ~self.long_range) if m.any()]
        return float(torch.stack(parts).mean())


def _response_positions(sample: Sample) -> torch.Tensor:
    return sample.response_mask[1:].nonzero().squeeze(1)


def _coarse_logp(logits: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
    """``[T, k + 1]`` log-probabilities of the ``top_ids`` tokens and of all the others."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.gather(1, top_ids)
    rest = torch.log1p(-top.exp().sum(1).clamp(max=1 - 1e-7))
    return torch.cat([top, rest[:, None]], 1)


def batches(samples: Sequence[Sample]) -> list[list[int]]:
    """The samples' indices as the model runs them: those of one length together, ``BATCH``
    at a time, lengths in order of first appearance."""
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(int(s.input_ids.shape[0]), []).append(i)
    return [rows[start:start + BATCH] for rows in by_length.values()
            for start in range(0, len(rows), BATCH)]


@torch.inference_mode()
def _response_logits(model: torch.nn.Module, samples: Sequence[Sample]
                     ) -> list[torch.Tensor]:
    """Each sample's logits ``[T, vocab]`` at its response positions (:func:`batches`)."""
    out: list[torch.Tensor | None] = [None] * len(samples)
    device = next(model.parameters()).device
    for chunk in batches(samples):
        n = int(samples[chunk[0]].input_ids.shape[0])
        ids = torch.stack([samples[i].input_ids for i in chunk]).to(device)
        first = min(int(_response_positions(samples[i])[0]) for i in chunk)
        logits = model(input_ids=ids, logits_to_keep=n - first).logits.float().cpu()
        for row, i in enumerate(chunk):
            out[i] = logits[row, _response_positions(samples[i]) - first]
    return out  # type: ignore[return-value]


def _target_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]


def _references(model: torch.nn.Module, samples: Sequence[Sample], top_k: int,
                local: Callable[[], Callable[[], None]] | None) -> list[_Reference]:
    """The dense model's reference on each sample (see :class:`DenseReference`)."""
    dense = _response_logits(model, samples)
    local_logits: list[torch.Tensor | None] = [None] * len(dense)
    if local is not None:
        undo = local()
        try:
            local_logits = _response_logits(model, samples)
        finally:
            undo()
    refs = []
    for s, logits, near in zip(samples, dense, local_logits):
        k = min(top_k, logits.shape[1] - 1)
        top_ids = logits.topk(k, dim=1).indices
        positions = _response_positions(s)
        targets = s.input_ids[positions + 1]
        long_range = torch.zeros(len(positions), dtype=torch.bool) if near is None else (
            _target_logp(logits, targets) - _target_logp(near, targets) >= LONG_RANGE_GAIN)
        # a forced answer is told apart only where its long-range tokens are marked
        forced = near is not None and getattr(s, "answered", None) is False
        refs.append(_Reference(positions, targets, top_ids, _coarse_logp(logits, top_ids),
                               long_range, forced))
    return refs


def reference_part(model: torch.nn.Module, samples: Sequence[Sample], rows: list[int],
                   top_k: int = TOP_K, local: Callable[[], Callable[[], None]] | None = None
                   ) -> str:
    """The dense reference of the samples ``rows`` (one batch of :func:`batches`, so that it
    is computed exactly as :class:`DenseReference` computes it), packed as text: workers that
    share an optuna study each make some and assemble all (:meth:`DenseReference.from_parts`)
    instead of each running the dense model on every sample."""
    refs = _references(model, [samples[i] for i in rows], top_k, local)
    arrays = {}
    for j, ref in enumerate(refs):
        arrays[f"ids{j}"] = ref.top_ids.numpy().astype(np.int32)  # a vocabulary fits int32
        arrays[f"logp{j}"] = ref.top_logp.numpy()
        arrays[f"long{j}"] = ref.long_range.numpy()
        arrays[f"forced{j}"] = np.array(ref.forced)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class DenseReference:
    """The dense model's distributions on the response tokens of ``samples``, against which
    plans are scored (:meth:`score`).  ``local`` (a callable that makes the model attend
    locally and returns an undo callable, e.g. applying a plan) marks the long-range
    tokens; without it every token counts alike.  ``samples`` keeps the samples scored: with
    ``local``, a forced answer without a long-range token is left out (:meth:`_keep`)."""

    def __init__(self, model: torch.nn.Module, samples: Sequence[Sample], top_k: int = TOP_K,
                 local: Callable[[], Callable[[], None]] | None = None):
        if not samples:
            raise DataError("no held-out samples to validate plans on")
        for s in samples:
            if not bool(s.response_mask[1:].any()):
                raise DataError("a held-out sample has no response tokens")
        self.samples = list(samples)
        self._keep(_references(model, self.samples, top_k, local))

    @classmethod
    def from_parts(cls, samples: Sequence[Sample], parts: Sequence[tuple[list[int], str]]
                   ) -> DenseReference:
        """The reference of ``samples`` from :func:`reference_part` texts, ``(rows, text)``
        for every batch of :func:`batches` (made by several workers, in any order)."""
        reference = cls.__new__(cls)
        reference.samples = list(samples)
        refs: list[_Reference | None] = [None] * len(samples)
        for rows, text in parts:
            with np.load(io.BytesIO(base64.b64decode(text))) as arrays:
                for j, i in enumerate(rows):
                    positions = _response_positions(samples[i])
                    refs[i] = _Reference(positions, samples[i].input_ids[positions + 1],
                                         torch.from_numpy(arrays[f"ids{j}"].astype(np.int64)),
                                         torch.from_numpy(arrays[f"logp{j}"]),
                                         torch.from_numpy(arrays[f"long{j}"]),
                                         bool(arrays[f"forced{j}"]))
        if any(r is None for r in refs):
            raise DataError("the reference parts do not cover every held-out sample")
        reference._keep(refs)  # type: ignore[arg-type]
        return reference

    def _keep(self, refs: list[_Reference]) -> None:
        """Keep the samples a plan can show a loss on: a forced answer without a long-range
        token is left out (the dense model does not use the far context for it; on the
        reference model, copying a half line of code it cannot copy)."""
        kept = [(s, r) for s, r in zip(self.samples, refs)
                if not (r.forced and not r.long_range.any())]
        if not kept:
            raise DataError(f"none of the {len(refs)} samples shows what a plan loses: the "
                            "dense model missed every task and needs no far context for its "
                            "answers; give calibration data it can answer (--data JSONL in "
                            "its own format)")
        self.samples = [s for s, _ in kept]
        self.refs = [r for _, r in kept]

    def __len__(self) -> int:
        return len(self.samples)

    def forced(self) -> int:
        """How many of the scored samples are missed tasks with their answer forced."""
        return sum(r.forced for r in self.refs)

    def long_range_share(self) -> float:
        """The share of response tokens that are long-range."""
        flags = torch.cat([r.long_range for r in self.refs])
        return float(flags.float().mean())

    def focused(self) -> list[Sample]:
        """The samples with their response masks narrowed to the long-range tokens (a sample
        without any keeps its mask): what a profile should be taken on."""
        out = []
        for s, ref in zip(self.samples, self.refs):
            if not ref.long_range.any():
                out.append(s)
                continue
            mask = torch.zeros_like(s.response_mask)
            mask[ref.positions[ref.long_range] + 1] = True
            out.append(CalibrationSample(s.input_ids, mask))
        return out

    def score(self, model: torch.nn.Module, chunk: int = 8,
              report: Callable[[int, Score], None] | None = None) -> Score:
        """The model as it is now (a plan applied) against the dense reference, ``chunk``
        samples at a time; ``report(step, running score)`` is called after each chunk (it may
        raise to stop early, e.g. ``optuna.TrialPruned``)."""
        kl: list[float] = []
        match: list[bool] = []
        for step, start in enumerate(range(0, len(self.samples), chunk)):
            part = slice(start, start + chunk)
            for ref, logits in zip(self.refs[part], _response_logits(model, self.samples[part])):
                plan_logp = _coarse_logp(logits, ref.top_ids)
                p = ref.top_logp.exp()
                token_kl = (p * (ref.top_logp - plan_logp)).sum(1).clamp(min=0)
                kl.append(ref.sample_score(token_kl))
                match.append(bool((logits.argmax(1) == ref.top_ids[:, 0]).all()))
            if report is not None:
                report(step, Score(tuple(kl), tuple(match)))
        return Score(tuple(kl), tuple(match))


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (nan with fewer than 3 pairs or a constant side)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)
