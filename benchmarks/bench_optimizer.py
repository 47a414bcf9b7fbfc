"""Scale benchmark of the optimizer on the 2-core CPU reference machine.

Instances: 32 layers x 8 KV heads and 32 layers x 32 heads, every head choosing among the
208 rules of ``RuleSpace()``, KV density at 4 target lengths (4K-32K), synthetic costs with a
random influence decay per head at 4 profiled lengths (``moaplan.optimize.synthetic``).
Target: each solved to <= 0.5% gap in <= 60 s.

    python benchmarks/bench_optimizer.py [--out benchmarks/results/cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import time
from importlib.metadata import version

from moaplan.io import atomic_write_text
from moaplan.optimize import prune_dominated, solve
from moaplan.optimize.milp import run_highs
from moaplan.optimize.synthetic import synthetic_problem
from moaplan.rules import RuleSpace

LENGTHS = (4096, 8192, 16384, 32768)
CASES = [  # (layers, heads per layer, budget, per-layer bound)
    (32, 8, 0.5, None), (32, 8, 0.3, None), (32, 8, 0.2, None), (32, 8, 0.5, 0.7),
    (32, 32, 0.5, None), (32, 32, 0.3, None), (32, 32, 0.2, None), (32, 32, 0.5, 0.7),
]
TIME_LIMIT_S, GAP_TARGET = 60.0, 0.005


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_case(layers: int, heads: int, budget: float, layer_bound: float | None) -> dict:
    problem = synthetic_problem(layers, heads, budget, profiled_lengths=LENGTHS,
                                target_lengths=LENGTHS, seed=layers * heads)
    if layer_bound is not None:
        problem = dataclasses.replace(problem, group_max_density=layer_bound)
    kept = prune_dominated(problem.coefficients(), problem.density).sum()
    solution = solve(problem, time_limit=TIME_LIMIT_S)
    # The MILP alone, without the greedy certificate, for comparison.
    started = time.perf_counter()
    choice, highs_bound, _ = run_highs(problem, TIME_LIMIT_S, 1e-3)
    highs_s = time.perf_counter() - started
    highs_obj = problem.evaluate(choice)[0] if choice is not None else float("inf")
    return {
        "layers": layers, "heads_per_layer": heads, "heads": problem.n_heads,
        "rules": problem.n_rules, "columns_after_pruning": int(kept),
        "budget": budget, "per_layer_bound": layer_bound,
        "seconds": round(solution.seconds, 3), "status": solution.status,
        "gap": solution.gap, "objective": solution.objective, "bound": solution.bound,
        "densities": [round(float(d), 6) for d in solution.densities],
        "method": solution.method,
        "highs_only_seconds": round(highs_s, 3),
        "highs_only_gap": max(highs_obj - highs_bound, 0.0) / highs_obj if highs_obj > 0 else 0.0,
        "meets_target": bool(solution.gap <= GAP_TARGET and solution.seconds <= TIME_LIMIT_S),
    }


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Optimizer scale benchmark (CPU)", "",
        f"{meta['date']}, commit `{meta['commit']}`, {meta['cpu']} ({meta['cores']} cores), "
        f"cvxpy {meta['cvxpy']}, highspy {meta['highspy']}; 1-min load average "
        f"{meta['load_average_1min_before']:.1f} before, {meta['load_average_1min_after']:.1f} "
        "after (other jobs on the machine slow every column).", "",
        f"{meta['rules']} candidate rules (`RuleSpace()`), KV density at target lengths "
        f"{', '.join(map(str, LENGTHS))}, synthetic costs at the same 4 profiled lengths. "
        f"Target: gap <= {GAP_TARGET:.1%} in <= {TIME_LIMIT_S:g} s. `seconds` is the whole "
        "`solve()` call; `method` greedy means the greedy plan was proven within the gap by "
        "the Lagrangian bound (or beat HiGHS's incumbent). The last two columns run the cvxpy "
        "+ HiGHS MILP alone (pruned model, HiGHS gap 0.1%, same time limit).", "",
        "| heads | budget | per-layer bound | columns | seconds | status | method | gap "
        "| max density | meets | HiGHS alone: seconds | gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = "-" if r["per_layer_bound"] is None else f"{r['per_layer_bound']:g}"
        meets = "yes" if r["meets_target"] else "NO"
        lines.append(
            f"| {r['layers']}x{r['heads_per_layer']} = {r['heads']} | {r['budget']:g} | {bound} "
            f"| {r['columns_after_pruning']} | {r['seconds']:.2f} | {r['status']} "
            f"| {r['method']} | {r['gap']:.2e} | {max(r['densities']):.4f} | {meets} "
            f"| {r['highs_only_seconds']:.2f} | {r['highs_only_gap']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args()
    meta = {"date": datetime.date.today().isoformat(), "commit": _git_rev(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "cvxpy": version("cvxpy"), "highspy": version("highspy"),
            "rules": len(RuleSpace()), "lengths": list(LENGTHS),
            "time_limit_s": TIME_LIMIT_S, "gap_target": GAP_TARGET,
            # Other jobs on the machine slow every column; the load average says how much.
            "load_average_1min_before": os.getloadavg()[0]}
    rows = []
    for case in CASES:
        started = time.perf_counter()
        rows.append(run_case(*case))
        print(f"{case}: {rows[-1]['seconds']:.2f} s, gap {rows[-1]['gap']:.3%}, "
              f"{rows[-1]['status']} (wall {time.perf_counter() - started:.1f} s incl. setup)",
              flush=True)
    meta["load_average_1min_after"] = os.getloadavg()[0]
    atomic_write_text(os.path.join(args.out, "optimizer.json"),
                      json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    markdown = to_markdown(meta, rows)
    atomic_write_text(os.path.join(args.out, "optimizer.md"), markdown)
    print(markdown)
    if not all(r["meets_target"] for r in rows):
        raise SystemExit("some instance missed the target")


if __name__ == "__main__":
    main()
