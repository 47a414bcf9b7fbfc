"""Plot a profile: per head, how the influence is spread over distance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moaplan.io import atomic_write
from moaplan.profile.record import load_profile


def show_profile(path: str | Path, out_png: str | Path) -> Path:
    """Write a PNG with, per profiled length, one panel of ``|E|`` per block distance for each
    (layer, KV head) (log scale; one line per head, coloured by layer), and return its path.

    Influence per distance is ``far[delta].sum()`` normalised by the head's total, so heads of
    different scale share one axis; far-looking heads are the lines that stay high to the right.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile = load_profile(path)
    lengths = [n for n in profile.lengths if profile.finished[n]]
    kv_heads = profile.model.num_key_value_heads
    fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(6 * max(len(lengths), 1), 4.5),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, n in zip(axes[0], lengths, strict=False):
        per_delta = profile.far(n).sum(-1)
        share = per_delta / np.maximum(per_delta.sum(-1, keepdims=True), 1e-30)
        distance = (np.arange(share.shape[1]) + 0.5) * profile.block  # block centres
        for head, row in enumerate(share):
            layer = head // kv_heads
            ax.plot(distance, np.maximum(row, 1e-12), lw=0.8, alpha=0.7,
                    color=cmap(layer / max(profile.model.num_layers - 1, 1)))
        ax.set(xscale="log", yscale="log", xlabel="distance i - j (tokens, block centres)",
               ylabel="share of |E|", title=f"N = {n} ({profile.finished[n]} samples)")
    fig.suptitle(f"{profile.model.model_type or 'model'}: influence per distance, "
                 f"{profile.model.describe()} (colour = layer)")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        return atomic_write(out_png, write)
    finally:
        plt.close(fig)
