"""Human-readable views of a plan: a per-layer table and a span heatmap."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from moaplan.io import atomic_write
from moaplan.plan.record import Plan


def plan_table(plan: Plan, lengths: list[int]) -> str:
    """Per-layer rules and KV / attention densities at each length, as aligned text."""
    dens = plan.densities(lengths)
    head = ["layer", "rules"] + [f"kv@{n}" for n in lengths] + [f"attn@{n}" for n in lengths]
    rows = []
    for layer, layer_rules in enumerate(plan.rules):
        counts = Counter(rule.describe() for rule in layer_rules)
        summary = ", ".join(f"{c}x {d}" if c > 1 else d for d, c in counts.most_common())
        rows.append([str(layer), summary]
                    + [f"{x:.3f}" for x in dens["kv"][layer].mean(0)]
                    + [f"{x:.3f}" for x in dens["attention"][layer].mean(0)])
    rows.append(["all", f"{len(plan.flat_rules)} heads"]
                + [f"{x:.3f}" for x in dens["kv"].mean((0, 1))]
                + [f"{x:.3f}" for x in dens["attention"].mean((0, 1))])
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_record(plan: Plan, lengths: list[int]) -> dict:
    """A plan's summary for scripts (``--json``): the model's shape, the budget, and the mean
    KV / attention densities at each length, overall and per layer with its rules."""
    dens = plan.densities(lengths)
    shape = plan.model

    def at(values: np.ndarray) -> dict[str, float]:
        return {str(n): round(float(v), 6) for n, v in zip(lengths, values)}

    return {
        "model": {"model_type": shape.model_type, "layers": shape.num_layers,
                  "query_heads": shape.num_attention_heads,
                  "kv_heads": shape.num_key_value_heads, "head_dim": shape.head_dim},
        "budget": None if plan.budget is None else {"kind": plan.budget.kind,
                                                    "value": plan.budget.value},
        "kv_density": at(dens["kv"].mean((0, 1))),
        "attention_density": at(dens["attention"].mean((0, 1))),
        "layers": [{"rules": [rule.describe() for rule in layer_rules],
                    "kv_density": at(dens["kv"][layer].mean(0)),
                    "attention_density": at(dens["attention"][layer].mean(0))}
                   for layer, layer_rules in enumerate(plan.rules)],
    }


def plot_spans(plan: Plan, length: int, path: str | os.PathLike) -> Path:
    """Heatmap of each head's kept share of the keys (sink + span) / N at ``length``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = plan.densities([length])["kv"][..., 0]
    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * kept.shape[1], 1.2 + 0.3 * kept.shape[0]))
    image = ax.imshow(kept, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"kept keys / N at N={length} (mean {kept.mean():.3f})")
    ax.set_xticks(np.arange(kept.shape[1]))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return out
