"""Measure the trained reference model on the CPU and add the results to its card.

    python -m moaplan.training.report [DIR] [--samples 8] [--uniform-samples 4]

Adds ``cpu_report`` to ``DIR/summary.json`` (default: the shipped model), draws
``heads_map.png`` and re-renders ``MODEL_CARD.md``: the time to load the model and score 16
passkey samples at 4K tokens, dense passkey accuracy and perplexity, passkey accuracy under a
uniform sink + window plan at KV density 0.5, and the map of far-looking heads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moaplan.eval import passkey_accuracy, perplexity
from moaplan.eval.headmap import far_attention_share, plot_head_map
from moaplan.io import atomic_write, atomic_write_text
from moaplan.model.config import CONTEXT
from moaplan.model.loading import load_model, reference_model_path
from moaplan.plan import Budget, uniform_plan
from moaplan.runtime import apply, remove
from moaplan.shape import ModelShape
from moaplan.training.card import write_model_card

LENGTHS = (1024, 2048, CONTEXT)
UNIFORM_BUDGET = 0.5


def _machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        if cpuinfo.is_file()
        else []
    )
    return f"{platform.machine()}, {os.cpu_count()} cores" + (f", {names[0]}" if names else "")


def timing(model_dir: Path, batch_size: int) -> dict:
    """Seconds to load the model and to score 16 passkey samples at 4K tokens: wall clock,
    and this process's CPU time over all its threads (which other load on the machine does
    not inflate), with the machine's load average as it was."""
    wall, cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_model(model_dir)
    load_s = time.perf_counter() - wall
    passkey_accuracy(
        model, tokenizer, lengths=(CONTEXT,), depths=(0.5,), samples=16, batch_size=batch_size
    )
    record = {
        "machine": _machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "timing_length": CONTEXT,
        "load_seconds": round(load_s, 2),
        "score_seconds": round(time.perf_counter() - wall - load_s, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(record), flush=True)
    return record


def run(model_dir: Path, samples: int, uniform_samples: int, batch_size: int) -> dict:
    record = timing(model_dir, batch_size)
    model, tokenizer = load_model(model_dir)

    head_map = far_attention_share(model, tokenizer, length=CONTEXT, far=1024)
    atomic_write(model_dir / "heads_map.png", lambda tmp: plot_head_map(head_map, tmp))
    print(f"heads map, far share at the answer:\n{head_map.answer.round(2)}", flush=True)

    plan = uniform_plan(
        ModelShape.from_config(model.config), Budget("kv", UNIFORM_BUDGET), [CONTEXT]
    )
    apply(model, plan)
    uniform = passkey_accuracy(
        model, tokenizer, lengths=(CONTEXT,), samples=uniform_samples, batch_size=batch_size
    )
    remove(model)
    print(uniform.table(), flush=True)

    dense = passkey_accuracy(
        model, tokenizer, lengths=LENGTHS, samples=samples, batch_size=batch_size
    )
    print(dense.table(), flush=True)
    ppl = perplexity(
        model, tokenizer, lengths=(LENGTHS[0], CONTEXT), samples=samples, batch_size=batch_size
    )
    print(ppl.table(), flush=True)
    rule = plan.rules[0][0]
    return record | {
        "passkey_samples": samples,
        "passkey": dense.to_dict(),
        "passkey_table": dense.table(),
        "ppl": ppl.to_dict(),
        "ppl_table": ppl.table(),
        "uniform_rule": f"{rule.describe()} for every KV head",
        "uniform_density": float(plan.densities([CONTEXT])["kv"].max()),
        "uniform": uniform.to_dict(),
        "uniform_table": uniform.table(),
        "heads_map": head_map.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moaplan.training.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model_dir", nargs="?", type=Path, default=reference_model_path())
    parser.add_argument("--samples", type=int, default=8, help="per (length, depth) cell")
    parser.add_argument("--uniform-samples", type=int, default=4, help="per depth, at 4K")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="re-measure only the load + scoring time (e.g. on a quieter machine)",
    )
    args = parser.parse_args(argv)
    summary_path = args.model_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    if args.timing_only:
        report = summary["cpu_report"] | timing(args.model_dir, args.batch_size)
    else:
        report = run(args.model_dir, args.samples, args.uniform_samples, args.batch_size)
    summary["cpu_report"] = report
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    write_model_card(args.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
