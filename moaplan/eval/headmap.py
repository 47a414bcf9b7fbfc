"""Which heads look far: the share of each head's attention mass on distant keys.

Runs passkey prompts with eager attention (the only implementation that returns the
attention weights) and reduces each layer's weights as soon as the layer has run, through a
forward hook, so at most one layer's ``[B, H, N, N]`` weights exist at a time.

The share counts keys at distance >= ``far`` from the query, leaving out the first ``sink``
positions: nearly every head parks mass on the first tokens (attention sinks), which says
nothing about looking far.  Two query sets are reported: the answer region (the question and
the answer, where retrieval happens) and every query that has keys that far back.  A third
map is the needle mass: the answer region's attention mass on the needle's tokens (an
attention share, not Wu et al.'s retrieval score, which counts copied tokens:
:func:`moaplan.profile.scorers.retrieval_score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moaplan.data.corpus import stdlib_corpus
from moaplan.data.tasks import passkey_sample


@dataclass(frozen=True)
class HeadMap:
    answer: np.ndarray  # [layers, kv_heads]: far share at the answer-region queries
    all_queries: np.ndarray  # [layers, kv_heads]: far share at every query >= far
    needle: np.ndarray  # [layers, kv_heads]: mass on the needle at the answer-region queries
    length: int
    far: int
    sink: int
    samples: int

    def to_dict(self) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(self).items()}


def _mass(weights: torch.Tensor, queries: slice, keys: torch.Tensor) -> torch.Tensor:
    """Mean over batch and ``queries`` of the attention mass on ``keys`` (a ``[Q, N]`` bool
    mask): ``[B, H, N, N] -> [H]``."""
    return (weights[:, :, queries, :].float() * keys).sum(-1).mean(dim=(0, 2))


def _far_keys(n: int, queries: slice, far: int, sink: int) -> torch.Tensor:
    i = torch.arange(n)[queries, None]
    j = torch.arange(n)[None, :]
    return ((i - j) >= far) & (j >= sink)


@torch.inference_mode()
def far_attention_share(
    model,
    tokenizer,
    length: int = 4096,
    far: int = 1024,
    sink: int = 64,
    depths: Sequence[float] = (0.0, 0.25, 0.5),
    samples: int = 2,
    answer_queries: int = 48,
    seed: int = 0,
) -> HeadMap:
    """Average far-attention share per (layer, KV head) on ``samples`` passkey prompts per
    depth (needles at the given depths, so the answer has something far to look at)."""
    config = model.config
    n_layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    group = config.num_attention_heads // n_kv
    corpus = stdlib_corpus("heldout")
    rng = np.random.default_rng([seed, length, far])
    prompts = [
        passkey_sample(tokenizer, corpus, length, d, rng) for d in depths for _ in range(samples)
    ]
    answer, everywhere = slice(length - answer_queries, length), slice(far, length)
    far_at_answer = _far_keys(length, answer, far, sink)
    far_everywhere = _far_keys(length, everywhere, far, sink)
    needle_keys = torch.zeros(1, length, dtype=torch.bool)  # set per prompt below
    sums = {
        k: torch.zeros(n_layers, config.num_attention_heads) for k in ("answer", "all", "needle")
    }

    def hook(layer: int):
        def record(_module, _args, output):
            weights = output[1]
            sums["answer"][layer] += _mass(weights, answer, far_at_answer)
            sums["all"][layer] += _mass(weights, everywhere, far_everywhere)
            sums["needle"][layer] += _mass(weights, answer, needle_keys)

        return record

    previous = config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [
        layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)
    ]
    try:
        for prompt in prompts:
            needle_keys.zero_()
            needle_keys[0, slice(*prompt.needle)] = True
            model(input_ids=torch.tensor([prompt.input_ids], device=model.device), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)

    def per_kv_head(total: torch.Tensor) -> np.ndarray:
        return (total / len(prompts)).view(n_layers, n_kv, group).mean(-1).numpy()

    return HeadMap(
        answer=per_kv_head(sums["answer"]),
        all_queries=per_kv_head(sums["all"]),
        needle=per_kv_head(sums["needle"]),
        length=length,
        far=far,
        sink=sink,
        samples=len(prompts),
    )


def plot_head_map(head_map: HeadMap, path: str) -> None:
    """Three heatmaps, layers down and KV heads across: far share at the answer queries and
    at all queries, and the answer queries' mass on the needle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (f"far share (>= {head_map.far}), answer queries", head_map.answer),
        (f"far share (>= {head_map.far}), all queries", head_map.all_queries),
        ("mass on the needle, answer queries", head_map.needle),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (title, data) in zip(axes, panels):
        top = max(0.05, float(data.max()))
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=top)
        for (layer, head), value in np.ndenumerate(data):
            color = "white" if value < 0.6 * top else "black"
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(
        f"attention of each (layer, KV head) on passkey prompts of {head_map.length} tokens "
        f"(far: distance >= {head_map.far}, keys >= {head_map.sink}; {head_map.samples} prompts)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
