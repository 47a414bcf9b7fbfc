"""The benchmark suite: run every section this machine can run, then plot and summarise.

    python benchmarks/run.py [--quick] [--section NAME ...] [--out DIR] [--no-readme]
                             [--summary-only]

Sections (each its own script, run as a subprocess): on a machine with a CUDA GPU prefill,
layers (a MoA-like plan layer by layer, routed), decode (kernel and end to end), first-token
(time to first token of an 8B shape under three plans), profiler,
profiler-multi (torchrun on 2 GPUs; it says so and does nothing on one) and profiler-sharded
(a 70B shape with its layers over 2 GPUs; likewise); everywhere
optimizer, quality and scorers.  A section the machine cannot run is skipped with one line
saying why.  Results go to
``DIR/<machine>/`` (``cpu``, ``h100``, ...) with ``suite.json`` (machine, date, commit, time
per section); then the plots are drawn from whatever results ``DIR`` holds (each PNG beside
its JSON) and ``DIR/SUMMARY.md`` is written, and the same text replaces the README's
section between ``<!-- bench:start -->`` and ``<!-- bench:end -->``.  ``--quick`` runs the
short version of each section into ``build/bench-quick`` and leaves the README alone;
``--summary-only`` runs nothing and only redraws the plots and rewrites the summaries.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules, also when imported by tests

import plots  # noqa: E402
from provenance import provenance  # noqa: E402
from summary import readme_section, summary_markdown  # noqa: E402

from moaplan.io import atomic_write_text  # noqa: E402

REPO = HERE.parent
README = REPO / "README.md"
MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


@dataclass(frozen=True)
class Section:
    name: str
    script: str
    gpus: int  # CUDA GPUs it needs
    modules: tuple[str, ...]  # Python packages it imports that a machine may lack
    quick_args: tuple[str, ...] = ()
    # A full run without a GPU: what fits the CPU machine's time (the GPU run keeps the
    # script's own, larger, defaults).
    cpu_args: tuple[str, ...] = ()

    def command(self, out: Path, quick: bool, gpus: int) -> list[str]:
        if quick:
            extra = self.quick_args
        else:
            extra = () if gpus else self.cpu_args
        return [sys.executable, str(HERE / self.script), "--out", str(out), *extra]

    def cannot_run(self, gpus: int) -> str | None:
        """Why this machine (with ``gpus`` CUDA GPUs) cannot run the section, or None."""
        if gpus < self.gpus:
            plural = "s" if self.gpus > 1 else ""
            return f"needs {self.gpus} CUDA GPU{plural}, this machine has {gpus}"
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        return f"needs {', '.join(missing)} (not installed)" if missing else None


SECTIONS = (
    Section("prefill", "bench_prefill.py", 1, ("triton",), ("--quick",)),
    Section("layers", "bench_layers.py", 1, ("triton",), ("--lengths", "4096", "16384")),
    Section("decode", "bench_decode.py", 1, ("triton",), ("--skip-e2e",)),
    Section("first-token", "bench_first_token.py", 1, ("triton",), ("--layers", "4")),
    Section("profiler", "bench_profiler.py", 1, ("triton",),
            ("--lengths", "16384", "--skip-model-check")),
    Section("profiler-multi", "bench_profiler_multi.py", 2, ("triton",),
            ("--layers", "8", "--samples", "4")),
    Section("profiler-sharded", "bench_sharded_profile.py", 2, ("triton",),
            ("--lengths", "16384")),
    Section("optimizer", "bench_optimizer.py", 0, ("cvxpy", "highspy")),
    # On 2 CPU cores the reference test bed with 4 prompts per cell takes 25 min (96 paired
    # prompts per plan); the GPU run takes both trained test beds with 16 per cell.
    Section("quality", "bench_quality.py", 0, ("cvxpy", "highspy", "optuna"),
            ("--quick", "--testbed", "reference"), ("--testbed", "reference", "--samples", "4")),
    Section("scorers", "bench_scorers.py", 0, (), ("--quick",)),
    # The CPU run: the reference test bed alone (a search and 9 plans on 96 samples: more than
    # 25 min on 2 cores); a GPU takes both trained test beds in ~3 min.
    Section("query-spans", "bench_query_spans.py", 0, ("cvxpy", "highspy", "optuna"),
            ("--quick", "--testbed", "reference"), ("--testbed", "reference")),
)
BY_NAME = {s.name: s for s in SECTIONS}


def machine_name(card: str | None) -> str:
    """``cpu`` without a GPU, else the card's model in lower case (``h100``, ``a100``...)."""
    if not card:
        return "cpu"
    model = re.search(r"\b([A-Z]+\d{2,4}[A-Za-z]*)\b", card)
    return (model.group(1) if model else re.sub(r"\W+", "-", card)).lower()


def run_sections(names: list[str], out: Path, quick: bool, meta: dict) -> dict[str, dict]:
    """Run the sections in order; a failing section is recorded and the next one runs."""
    import torch

    gpus = torch.cuda.device_count()
    env = os.environ | {"MOAPLAN_COMMIT": meta["commit"]}  # every section's provenance()
    status: dict[str, dict] = {}
    bar = tqdm(names, desc="bench", unit="section")
    for name in bar:
        section = BY_NAME[name]
        reason = section.cannot_run(gpus)
        if reason:
            tqdm.write(f"skipped {name}: {reason}")
            status[name] = {"status": "skipped", "reason": reason}
            continue
        bar.set_postfix(section=name)
        command = section.command(out, quick, gpus)
        tqdm.write(f"== {name}: {' '.join(command)}")
        started = time.perf_counter()
        code = subprocess.run(command, cwd=REPO, env=env).returncode
        seconds = round(time.perf_counter() - started, 1)
        status[name] = {"status": "ok" if code == 0 else f"failed (exit {code})",
                        "seconds": seconds}
        tqdm.write(f"== {name}: {status[name]['status']} in {seconds:.0f} s")
    bar.close()
    return status


def draw_plots(root: Path) -> list[Path]:
    """Every plot whose result JSON exists under ``root/<machine>/``, beside that JSON."""
    drawn = []
    for result in sorted(root.glob("*/quality-*.json")):
        report = plots.load(result)
        drawn.append(plots.quality_accuracy(report,
                                            result.with_name(f"{result.stem}_accuracy.png")))
        for task in plots.TASKS:
            drawn.append(plots.quality_heatmaps(report, task,
                                                result.with_name(f"{result.stem}_{task}.png")))
    for result in sorted(root.glob("*/prefill.json")):
        drawn.append(plots.prefill_speedup(plots.load(result),
                                           result.with_name("prefill_speedup.png")))
    for result in sorted(root.glob("*/decode.json")):
        drawn.append(plots.decode_bandwidth(plots.load(result),
                                            result.with_name("decode_bandwidth.png")))
    return drawn


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the bench markers, or append a marked section."""
    text = readme.read_text(encoding="utf-8") if readme.exists() else ""
    block = f"{MARKERS[0]}\n{section.rstrip()}\n{MARKERS[1]}"
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if 0 <= start < end:
        text = text[:start] + block + text[end + len(MARKERS[1]):]
    else:
        text = text.rstrip() + "\n\n## Benchmark results\n\n" + block + "\n"
    atomic_write_text(readme, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short version of every section (results in build/bench-quick)")
    parser.add_argument("--section", nargs="+", choices=list(BY_NAME), metavar="NAME",
                        help=f"run only these sections ({', '.join(BY_NAME)})")
    parser.add_argument("--out", type=Path,
                        help="results root (default benchmarks/results; quick: build/bench-quick)")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--summary-only", action="store_true",
                        help="run no section: redraw the plots and rewrite the summaries from "
                             "the results on file")
    args = parser.parse_args(argv)
    root = (args.out or (REPO / "build/bench-quick" if args.quick else HERE / "results")).resolve()
    meta = provenance()
    machine = machine_name(meta["card"])
    suite = None
    if not args.summary_only:
        out = root / machine
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        status = run_sections(args.section or list(BY_NAME), out, args.quick, meta)
        suite = meta | {"machine": machine, "quick": args.quick, "sections": status,
                        "seconds": round(time.perf_counter() - started, 1)}
        atomic_write_text(out / "suite.json", json.dumps(suite, indent=1) + "\n")
        print(f"{machine}: " + ", ".join(f"{n} {s['status']}" for n, s in status.items())
              + f"; {suite['seconds'] / 60:.1f} min")

    draw_plots(root)
    atomic_write_text(root / "SUMMARY.md", summary_markdown(root, machine, suite))
    if args.quick or args.no_readme:
        print(f"wrote {root / 'SUMMARY.md'}; README.md left as it is (quick run or --no-readme)")
    else:
        update_readme(README, readme_section(root, README.parent, machine, suite))
        print(f"wrote {root / 'SUMMARY.md'} and the results section of {README}")
    ok = suite is None or all(s["status"] in ("ok", "skipped") for s in suite["sections"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
