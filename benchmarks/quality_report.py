"""Reading and rendering ``quality-<testbed>.json``: the table, the paired comparisons with
their intervals, and the claims checked.  No model or solver imports, so any machine can
summarise the results.

Every comparison is paired (the same prompts and text windows for every plan).  Retrieval:
the difference in accuracy with its 95% interval, and McNemar's exact test on the prompts
where the two plans disagree; a difference is called only when p < 0.05, else "tie".  Text
and validation KL: the mean per-window (per-sample) difference with its 95% t-interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

METHODS = ("streaming", "duo", "searched", "first order")  # compared at each budget
TASKS = ("passkey", "kv")


@dataclass(frozen=True)
class MethodResult:
    method: str  # "dense" or one of METHODS
    budget: float | None
    raw: dict[str, Any]

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method} @ {self.budget:g}"

    def hits(self, task: str | None = None, length: int | None = None) -> np.ndarray:
        """Per-prompt correctness, in one fixed order (tasks, then cells, then samples)."""
        out = []
        for t in TASKS if task is None else (task,):
            for c in self.raw[t]["cells"]:
                if length is None or c["length"] == length:
                    out += c["hits"]
        return np.asarray(out, dtype=float)

    def accuracy(self, task: str | None = None, length: int | None = None) -> float:
        return float(self.hits(task, length).mean())

    def kv_density(self) -> float:
        return self.raw["kv_density"][max(self.raw["kv_density"], key=int)]

    def attention_density(self) -> float:
        return self.raw["attention_density"][max(self.raw["attention_density"], key=int)]

    def ppl(self) -> float:
        return self.raw["perplexity"]["cells"][-1]["perplexity"]


def results(report: dict[str, Any]) -> list[MethodResult]:
    return [MethodResult(m["method"], m["budget"], m) for m in report["methods"]]


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% t-interval."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if x.size < 2 or not np.ptp(x):
        return mean, mean, mean
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value of paired binary outcomes."""
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def compare(ours: MethodResult, other: MethodResult) -> dict[str, Any]:
    """``ours`` vs ``other``: retrieval difference (interval, McNemar p, verdict) and text /
    validation KL differences (intervals; lower KL is better)."""
    a, b = ours.hits(), other.hits()
    diff = interval(a - b)
    p = mcnemar(a, b)
    verdict = "tie" if p >= 0.05 else ("better" if diff[0] > 0 else "worse")
    text = interval(np.subtract(ours.raw["text_kl"], other.raw["text_kl"]))
    val = interval(np.subtract(ours.raw["validation_kl"], other.raw["validation_kl"]))
    return {"diff": diff, "p": p, "verdict": verdict, "text_kl": text, "validation_kl": val,
            "n": a.size}


def _fmt(t: tuple[float, float, float], digits: int = 2) -> str:
    return f"{t[0]:+.{digits}f} [{t[1]:+.{digits}f}, {t[2]:+.{digits}f}]"


def _and(values: list) -> str:
    """``1, 2 and 3``."""
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def describe(report: dict[str, Any]) -> str:
    meta, s, bed = report["meta"], report["meta"]["settings"], report["meta"]["testbed"]
    where = meta["card"] or f"{meta['cpu']} ({meta['cores']} cores)"
    cells = len(s["lengths"]) * len(s["depths"])
    return (
        f"Test bed `{bed['name']}` (task wording `{bed['phrasing']}`) on {where}, "
        f"{meta['date']}, commit `{meta['commit'][:12]}`, {meta.get('seconds', 0) / 60:.1f} min. "
        f"KV budgets {', '.join(map(str, s['budgets']))}; every plan meets its budget at each "
        f"of {s['target_lengths']}.  Retrieval: {s['samples']} prompts per (length, depth) "
        f"cell and task, lengths {s['lengths']}, depths "
        f"{', '.join(f'{d:g}' for d in s['depths'])}: {2 * cells * s['samples']} prompts per "
        f"plan, the same for every plan.  Text: perplexity and KL(dense || plan) per token on "
        f"{s['text_windows']} held-out windows of {max(s['lengths'])} tokens.  Validation KL: "
        f"the search's score, on its {s['validation_samples']} held-out samples at "
        f"{_and(s.get('validation_lengths', [s['validation_length'], max(s['lengths'])]))} "
        "tokens.  Search: "
        f"{s['profile_samples']} calibration samples per profiled length, "
        + ("model-generated, in the test bed's own task wording (as a user's data in their "
           "model's format would be)" if s.get("own_wording") else
           "the default model-generated data in the calibration wordings (never the test "
           "bed's own unless it is `reference`)")
        + f", {s['ablate']} single-head ablations, at most {s['candidates']} candidates."
    )


def quality_table(report: dict[str, Any]) -> str:
    rows = results(report)
    dense = next(r for r in rows if r.method == "dense")
    lengths = report["meta"]["settings"]["lengths"]
    head = (["method", "KV dens.", "attn dens."] + [f"retrieval @{n}" for n in lengths]
            + ["retrieval [95% CI]", "kept where dense right", "ppl", "text KL",
               "validation KL"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    right = dense.hits() == 1
    for r in rows:
        acc = interval(r.hits())
        kept = float(r.hits()[right].mean()) if right.any() else float("nan")
        cells = ([r.label, f"{r.kv_density():.3f}", f"{r.attention_density():.3f}"]
                 + [f"{r.accuracy(length=n):.2f}" for n in lengths]
                 + [f"{acc[0]:.2f} [{acc[1]:.2f}, {acc[2]:.2f}]", f"{kept:.2f}",
                    f"{r.ppl():.3f}", f"{np.mean(r.raw['text_kl']):.4f}",
                    f"{np.mean(r.raw['validation_kl']):.4f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(report: dict[str, Any]) -> list[str]:
    """Searched against every other method at each budget, and against dense."""
    rows = results(report)
    dense = next(r for r in rows if r.method == "dense")
    lines = []
    for budget in report["meta"]["settings"]["budgets"]:
        by = {r.method: r for r in rows if r.budget == budget}
        if "searched" not in by:
            continue
        s = by["searched"]
        ratio = s.accuracy() / max(dense.accuracy(), 1e-9)
        parts = [f"- KV {budget:g}: searched retrieval {s.accuracy():.2f} = {ratio:.2f}x dense "
                 f"({dense.accuracy():.2f})"]
        for m in ("streaming", "duo", "first order"):
            if m in by:
                c = compare(s, by[m])
                parts.append(f"vs {m}: {_fmt(c['diff'])} (McNemar p={c['p']:.2g}, "
                             f"{c['n']} paired prompts) -> **{c['verdict']}**; text KL "
                             f"{_fmt(c['text_kl'], 4)}")
        lines.append("; ".join(parts))
    return lines


def validation_agreement(report: dict[str, Any]) -> list[str]:
    """Does the search's validation score rank plans the way measured retrieval does?  And
    does the ablation correction make the optimizer's prediction agree better?"""
    rows = [r for r in results(report) if r.method != "dense"]
    lines = []
    if len(rows) >= 3:
        rho = stats.spearmanr([-np.mean(r.raw["validation_kl"]) for r in rows],
                              [r.accuracy() for r in rows]).statistic
        lines.append(f"- Validation score vs measured retrieval over {len(rows)} plans: "
                     f"Spearman {rho:.2f} (minus the mean validation KL against retrieval "
                     "accuracy; 1 = the same ranking)")
    for s in report.get("searches", []):
        a = s["agreement"]
        lines.append(f"- Search at KV {s['budget']:g} ({s['seconds']:.0f} s, chose "
                     f"`{s['chosen']}`): predicted vs measured validation KL over its complete "
                     f"candidates, Spearman {a['first_order']:.2f} first order -> "
                     f"{a['corrected']:.2f} after the ablation correction")
    return lines


def markdown(report: dict[str, Any]) -> str:
    parts = [f"# Quality: `{report['meta']['testbed']['name']}`"
             + (" calibrated in its own wording" if report["meta"]["settings"].get("own_wording")
                else ""), describe(report),
             quality_table(report), "Paired comparisons (searched minus the other; retrieval "
             "as a share of prompts, a verdict only where McNemar's p < 0.05):",
             "\n".join(verdicts(report)), "\n".join(validation_agreement(report))]
    return "\n\n".join(p for p in parts if p) + "\n"
