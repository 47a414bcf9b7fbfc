"""AttentionInfluence (Hua et al.): score data by how much masking the retrieval heads hurts.

For each sample, the loss (mean cross-entropy over the response tokens of a prompt/response
pair, over every token of plain text: see :mod:`moaplan.data.calibration`) is measured with
the model dense and with some heads masked; the score is the relative increase
``(masked - dense) / dense``.  A sample scores high when predicting it needs what those heads
do — look something up far back in the context — and low when local context suffices.

Masking is a plan applied with :func:`moaplan.apply`, so it runs through the same attention
and kernels as any plan: either a plan file (its rules are the mask), or
:func:`masked_heads_plan`, every KV head full except the chosen ones (e.g. the top-K
retrieval heads of :mod:`moaplan.profile.scorers`), which keep only a short local window.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moaplan.errors import PlanError
from moaplan.io import atomic_write_text
from moaplan.plan import Plan
from moaplan.profile.profiler import Sample, response_losses
from moaplan.rules import Rule
from moaplan.runtime import apply, remove
from moaplan.shape import ModelShape

# What a masked head keeps by default: its 64 latest keys and StreamingLLM's 4 sink tokens.
# Without the sinks a head that parks its mass on the first tokens (most do when idle) is
# pushed onto local tokens, which hurts every sample, not only those that need retrieval.
LOCAL_WINDOW = Rule.window(64, sink=4)


@dataclass(frozen=True)
class InfluenceScore:
    index: int  # position of the sample in the data
    score: float  # (masked_loss - dense_loss) / dense_loss
    dense_loss: float
    masked_loss: float


def masked_heads_plan(shape: ModelShape, heads: Iterable[tuple[int, int]],
                      rule: Rule = LOCAL_WINDOW) -> Plan:
    """Full attention for every KV head except ``heads`` ((layer, KV head) pairs): ``rule``."""
    heads = set(heads)
    outside = [h for h in heads if not (0 <= h[0] < shape.num_layers
                                        and 0 <= h[1] < shape.num_key_value_heads)]
    if outside:
        raise PlanError(f"head {outside[0]} is not in a model with {shape.describe()}")
    rules = [[rule if (layer, head) in heads else Rule.full_attention()
              for head in range(shape.num_key_value_heads)] for layer in range(shape.num_layers)]
    return Plan(model=shape, rules=rules,
                provenance={"masked_heads": sorted(map(list, heads)), "rule": rule.describe()})


def retrieval_mask_plan(model: torch.nn.Module, tokenizer: Any, count: int,
                        rule: Rule = LOCAL_WINDOW, *, scores: str | Path | None = None,
                        lengths: Sequence[int] = (2048,), samples: int = 4) -> Plan:
    """:func:`masked_heads_plan` of the ``count`` KV heads that retrieve most: ranked by the
    profile ``scores`` (any scorer's, its first ranking), else by retrieval scores measured
    now on ``samples`` needle prompts of each of ``lengths`` tokens."""
    from moaplan.profile import load_profile
    from moaplan.profile.compare import profile_rankings, top_heads
    from moaplan.profile.scorers import head_scores

    if scores is not None:
        ranking = next(iter(profile_rankings(load_profile(scores)).values()))
    else:
        ranking = head_scores(model, tokenizer, "retrieval", list(lengths),
                              samples).mean("retrieval")
    return masked_heads_plan(ModelShape.from_config(model.config), top_heads(ranking, count),
                             rule)


def influence_scores(model: torch.nn.Module, samples: Sequence[Sample], plan: Plan | str | Path,
                     *, on_sample: Callable[[], None] | None = None,
                     strict: bool = True) -> list[InfluenceScore]:
    """Score every sample: its loss dense, then under ``plan`` (called back after each of the
    ``2 * len(samples)`` forward passes); ``strict`` as in :func:`moaplan.apply`."""
    dense = response_losses(model, samples, on_sample)
    apply(model, plan, strict=strict)
    try:
        masked = response_losses(model, samples, on_sample)
    finally:
        remove(model)
    return [InfluenceScore(i, (m - d) / max(d, 1e-12), d, m)
            for i, (d, m) in enumerate(zip(dense, masked, strict=True))]


def write_scores(path: str | Path, scores: Iterable[InfluenceScore]) -> Path:
    """One JSON object per line: ``index``, ``score``, ``dense_loss``, ``masked_loss``."""
    text = "".join(json.dumps(asdict(s)) + "\n" for s in scores)
    return atomic_write_text(path, text)


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The probability that a random positive scores above a random negative (ties count
    half): the area under the ROC curve of separating them by score."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return sum(pairs) / len(pairs)

