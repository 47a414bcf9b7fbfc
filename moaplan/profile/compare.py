"""How much the head scorers agree: pairwise overlap of their top-K KV heads.

A ranking is a ``[layers, kv_heads]`` array, higher = more important:

- ``gradient``: the share of a length's total influence that a head loses under a
  StreamingLLM rule (the largest sink of the profile's rule space + 256 recent keys), averaged
  over the profiled lengths — the long-range influence the DuoAttention-style baseline ranks
  heads by;
- ``retrieval``, ``echo``, ``induction``: the scores of :mod:`moaplan.profile.scorers`.

Heads that score 0 are never counted as top heads (a scorer that finds fewer than K heads has
a smaller top set), so ties among unscored heads cannot make up overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moaplan.errors import ModelError
from moaplan.profile.profiler import Progress, profile_model
from moaplan.profile.record import Profile
from moaplan.profile.scorers import head_scores
from moaplan.rules import Rule

STREAM_RECENT = 256


def gradient_importance(profile: Profile) -> np.ndarray:
    """Per (layer, KV head), the normalised influence a streaming rule drops (see above)."""
    rule = Rule.window(STREAM_RECENT, sink=max(profile.rule_space.sinks))
    shape = profile.model
    return profile.dropped_share(rule).reshape(shape.num_layers, shape.num_key_value_heads)


def profile_rankings(profile: Profile) -> dict[str, np.ndarray]:
    """The rankings a profile file carries: a head scorer's raw scores, else the gradient's."""
    if profile.head_scores:
        return {name: np.asarray(v, dtype=np.float64) for name, v in profile.head_scores.items()}
    return {profile.scorer: gradient_importance(profile)}


def top_heads(scores: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The (layer, KV head) of the ``k`` highest positive scores."""
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not 1 <= k <= flat.size:
        raise ModelError(f"cannot take the top {k} of {flat.size} KV heads")
    order = np.argsort(-flat, kind="stable")[:k]
    heads = scores.shape[1]
    return {(int(i) // heads, int(i) % heads) for i in order if flat[i] > 0}


@dataclass(frozen=True)
class Overlap:
    first: str
    second: str
    common: int  # heads in both top sets
    jaccard: float  # common / size of the union (0 when both sets are empty)


def overlaps(rankings: Mapping[str, np.ndarray], k: int) -> list[Overlap]:
    """Every pair of rankings, in the order given."""
    tops = {name: top_heads(scores, k) for name, scores in rankings.items()}
    rows = []
    for a, b in itertools.combinations(tops, 2):
        union = tops[a] | tops[b]
        common = len(tops[a] & tops[b])
        rows.append(Overlap(a, b, common, common / len(union) if union else 0.0))
    return rows


def overlap_markdown(rankings: Mapping[str, np.ndarray], k: int) -> str:
    """The pairwise table, then each ranking's top heads."""
    lines = [f"| scorers | common top-{k} heads | Jaccard |", "|---|---:|---:|"]
    lines += [f"| {o.first} vs {o.second} | {o.common} | {o.jaccard:.2f} |"
              for o in overlaps(rankings, k)]
    lines += ["", f"| scorer | top-{k} (layer, KV head): score |", "|---|---|"]
    for name, scores in rankings.items():
        top = sorted(top_heads(scores, k), key=lambda h: -scores[h])
        listed = ", ".join(f"({layer}, {head}): {scores[layer, head]:.3g}" for layer, head in top)
        lines.append(f"| {name} | {listed or 'none'} |")
    return "\n".join(lines)


def scorer_rankings(model: torch.nn.Module, tokenizer: Any, lengths: Sequence[int],
                    samples: int, *, gradient_samples: Mapping[int, Sequence[Any]],
                    seed: int = 0, on_sample: Callable[[Progress], None] | None = None
                    ) -> dict[str, np.ndarray]:
    """Rankings of every scorer on ``model``: the gradient profile of ``gradient_samples``
    (length -> calibration samples), and retrieval / echo / induction scores on ``samples``
    inputs of each of ``lengths``."""
    profile = profile_model(model, gradient_samples, on_sample=on_sample)
    retrieval = head_scores(model, tokenizer, "retrieval", lengths, samples, seed, on_sample)
    copying = head_scores(model, tokenizer, "induction", lengths, samples, seed, on_sample)
    return {"gradient": gradient_importance(profile), "retrieval": retrieval.mean("retrieval"),
            "echo": copying.mean("echo"), "induction": copying.mean("induction")}
