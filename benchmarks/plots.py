"""PNG plots of the benchmark results: quality (accuracy vs budget, length x depth heatmaps),
prefill speedup vs density, decode bandwidth.  Each function reads one result JSON (as
written by its benchmark) and writes one PNG atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; CI has no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from quality_report import METHODS, MethodResult, results  # noqa: E402

from moaplan.io import atomic_write  # noqa: E402

TASKS = {"passkey": "passkey retrieval", "kv": "key-value retrieval"}
COLORS = {"dense": "black", "streaming": "tab:orange", "duo": "tab:green", "searched": "tab:blue",
          "first order": "tab:purple"}
OURS, BASE = "tab:blue", "tab:gray"


def _save(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def load(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def quality_accuracy(report: dict[str, Any], path: Path) -> Path:
    """Mean accuracy over the length x depth grid against the KV budget, one line per method."""
    rows = results(report)
    budgets = sorted({r.budget for r in rows if r.budget is not None})
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6), sharey=True)
    for ax, (task, title) in zip(axes, TASKS.items()):
        for r in rows:
            if r.method == "dense":
                ax.axhline(r.accuracy(task), color=COLORS["dense"], ls="--", label="dense")
        for method in METHODS:
            points = sorted((r.budget, r.accuracy(task)) for r in rows if r.method == method)
            if points:
                ax.plot(*zip(*points), marker="o", color=COLORS[method], label=method)
        ax.set(title=title, xlabel="KV budget (density)", ylim=(-0.03, 1.03), xticks=budgets,
               xlim=(min(budgets, default=0.5) - 0.05, max(budgets, default=0.5) + 0.05))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over lengths x depths)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, path)


def _grid(r: MethodResult, task: str) -> tuple[list[int], list[float], np.ndarray]:
    cells = r.raw[task]["cells"]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = np.full((len(lengths), len(depths)), np.nan)
    for c in cells:
        acc[lengths.index(c["length"]), depths.index(c["depth"])] = c["accuracy"]
    return lengths, depths, acc


def quality_heatmaps(report: dict[str, Any], task: str, path: Path) -> Path:
    """Accuracy of one task over length x depth: a row per method, a column per budget."""
    rows = results(report)
    # One column per budget (at least one, for a run that has only measured dense so far).
    budgets = sorted({r.budget for r in rows if r.budget is not None}, reverse=True) or [None]
    methods = ["dense", *METHODS]
    fig, axes = plt.subplots(len(methods), len(budgets), squeeze=False, layout="constrained",
                             figsize=(2.9 * len(budgets) + 1, 2.3 * len(methods)))
    image = None
    for i, method in enumerate(methods):
        for j, budget in enumerate(budgets):
            ax = axes[i, j]
            want = None if method == "dense" else budget
            found = [r for r in rows if r.method == method and r.budget == want]
            if not found or (method == "dense" and j):
                ax.axis("off")
                continue
            lengths, depths, acc = _grid(found[0], task)
            image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (y, x), value in np.ndenumerate(acc):
                ax.text(x, y, f"{value:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
            ax.set_title(method if method == "dense" else f"{method} @ {budget:g}", fontsize=9)
            if i == len(methods) - 1:
                ax.set_xlabel("needle depth", fontsize=8)
            if j == 0:
                ax.set_ylabel("length", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle(TASKS[task])
    return _save(fig, path)


def prefill_speedup(report: dict[str, Any], path: Path) -> Path:
    """Speedup over SDPA dense against attention density: moaplan, FlexAttention, ideal."""
    rows = report["rows"]
    lengths = sorted({r["n"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.4 * len(lengths), 3.4), sharey=True)
    for ax, n in zip(np.atleast_1d(axes), lengths):
        at = sorted((r for r in rows if r["n"] == n), key=lambda r: r["density"])
        dens = [r["density"] for r in at]
        dense = [r["ms"]["sdpa_default_dense"] for r in at]
        for key, label, style in (("ours", "moaplan", "o-"), ("flex", "FlexAttention", "s--"),
                                  ("ideal", "ideal (density x dense)", ":")):
            ax.plot(dens, [d / r["ms"][key] for d, r in zip(dense, at)], style, label=label)
        ax.axhline(1, color="gray", lw=0.8)
        ax.set(title=f"N = {n}", xlabel="attention density", xlim=(0, 1.05), yscale="log")
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel("speedup vs SDPA dense causal")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"Prefill, {report['meta']['card']} (B=1, 32/8 heads, D=128, bf16)", y=1.03)
    return _save(fig, path)


def decode_bandwidth(report: dict[str, Any], path: Path) -> Path:
    """Decode kernel bandwidth (useful bytes / time) against SDPA on the dense cache, and
    end-to-end tokens/s when the result has them."""
    kernel = report["kernel"]
    e2e = report.get("e2e")
    fig, axes = plt.subplots(1, 2 if e2e else 1, figsize=(10 if e2e else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    x = np.arange(len(kernel))
    for shift, key, label, color in ((-0.2, "moaplan", "moaplan (useful bytes)", OURS),
                                     (0.2, "sdpa", "SDPA, dense cache", BASE)):
        ms = [k["best"]["ms"] if key == "moaplan" else k["sdpa_ms"] for k in kernel]
        tb = [k["best"]["useful_tb_s"] if key == "moaplan" else k["sdpa_tb_s"] for k in kernel]
        bars = ax.bar(x + shift, tb, 0.4, label=label, color=color)
        ax.bar_label(bars, [f"{t:.3f} ms" for t in ms], fontsize=7)
    ax.set_xticks(x, [f"B={k['batch']}, N={k['n'] // 1024}K\nKV dens. {k['kv_density']:.2f}"
                      for k in kernel])
    ax.set(ylabel="TB/s", title="decode attention kernel", ylim=(0, 3.8))
    ax.legend(fontsize=8, loc="upper right")
    if e2e:
        ax = axes[0, 1]
        dense, ours = e2e["dense"], e2e["moaplan"]
        groups = [(f"batch {dense['batch']}", dense["tokens_per_s"], ours["tokens_per_s"]),
                  ("largest batch\n" f"({dense['at_largest_batch']['batch']} vs "
                   f"{ours['at_largest_batch']['batch']})",
                   dense["at_largest_batch"]["tokens_per_s"],
                   ours["at_largest_batch"]["tokens_per_s"])]
        x = np.arange(len(groups))
        ax.bar(x - 0.2, [g[2] for g in groups], 0.4, label="MoaplanCache + plan", color=OURS)
        ax.bar(x + 0.2, [g[1] for g in groups], 0.4, label="DynamicCache + SDPA", color=BASE)
        ax.set_xticks(x, [g[0] for g in groups])
        ax.set(ylabel="tokens/s",
               title=f"{e2e['layers']}-layer 8B-shaped model, {e2e['n'] // 1024}K context")
        ax.legend(fontsize=8)
    fig.suptitle(f"Decode, {report['card']} (bf16, 32/8 heads, D=128)", y=1.03)
    return _save(fig, path)
