"""Multi-GPU profiling: the same samples profiled by one process and by ``torchrun`` on
several GPUs must give the same profile, faster.

    python benchmarks/bench_profiler_multi.py --out DIR [--gpus 2] [--layers 32]
                                              [--length 16384] [--samples 8]

The parent launches ``torchrun --nproc-per-node 1`` and then ``--nproc-per-node G`` on this
very script in worker mode; each worker builds the Llama-3-8B-shaped model of
``bench_profiler`` (random bf16 weights, same seed on every rank, so every rank holds the same
model), profiles ``--samples`` random samples with gradient checkpointing (rank ``r`` takes
samples ``r, r + G, ...``; the summaries are all-reduced over NCCL), and rank 0 saves the
profile and its wall time (the profiling alone, model building excluded).  The parent compares
the two profiles and writes ``DIR/profiler_multi.{json,md}``.  With fewer than ``G`` GPUs it
writes nothing and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_profiler import make_model, make_sample  # noqa: E402
from provenance import provenance  # noqa: E402

from moaplan.io import atomic_write_text  # noqa: E402
from moaplan.profile import load_profile, profile_model, save_profile  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl")
    model = make_model(args.layers)
    # Warm-up (Triton compiles, cuDNN plans) so neither timed run pays for it.
    profile_model(model, {1024: [make_sample(1024)] * world}, backend="triton",
                  gradient_checkpointing=True)
    torch.manual_seed(1)  # the same samples on every rank and in every run
    samples = {args.length: [make_sample(args.length) for _ in range(args.samples)]}
    if world > 1:
        dist.barrier()
    torch.cuda.synchronize()
    start = time.perf_counter()
    profile = profile_model(model, samples, backend="triton", gradient_checkpointing=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        save_profile(profile, args.worker)
        atomic_write_text(Path(args.worker).with_suffix(".time"), f"{seconds}\n")
    if world > 1:
        dist.destroy_process_group()


def launch(script_args: list[str], gpus: int, profile_path: Path) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={gpus}", __file__, *script_args, "--worker", str(profile_path)]
    subprocess.run(command, check=True)
    return float(profile_path.with_suffix(".time").read_text())


def markdown(res: dict) -> str:
    rows = "\n".join(f"| {r['gpus']} | {r['seconds']:.1f} | {r['speedup']:.2f}x |"
                     for r in res["runs"])
    return (f"# Profiling on several GPUs ({res['card']} x{res['gpus']})\n\n"
            f"{res['date']}, commit `{res['commit']}`.  Llama-3-8B shape, {res['layers']} "
            f"layers, random bf16 weights; {res['samples']} samples of {res['length']} tokens, "
            "gradient checkpointing, Triton influence kernel; time of `profile_model` alone "
            "(model building excluded), all-reduce included.\n\n"
            "| GPUs | seconds | speedup |\n|---:|---:|---:|\n" + rows + "\n\n"
            f"Same profile: max relative difference of the summed summaries "
            f"{res['max_rel_diff']:.2e} (far), {res['max_rel_diff_sink']:.2e} (sink).\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/h100"))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by the parent under torchrun
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if torch.cuda.device_count() < args.gpus:
        print(f"skipped: needs {args.gpus} GPUs, this machine has {torch.cuda.device_count()}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    passed = ["--layers", str(args.layers), "--length", str(args.length),
              "--samples", str(args.samples)]
    single, multi = args.out / "profile-1gpu.safetensors", args.out / "profile-ngpu.safetensors"
    t1 = launch(passed, 1, single)
    tn = launch(passed, args.gpus, multi)
    a, b = load_profile(single), load_profile(multi)

    def max_rel(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30))

    meta = provenance()
    res = {"card": meta["card"], "date": meta["date"], "commit": meta["commit"],
           "gpus": args.gpus, "layers": args.layers, "length": args.length,
           "samples": args.samples,
           "runs": [{"gpus": 1, "seconds": t1, "speedup": 1.0},
                    {"gpus": args.gpus, "seconds": tn, "speedup": t1 / tn}],
           "max_rel_diff": max_rel(a.far_sum[args.length], b.far_sum[args.length]),
           "max_rel_diff_sink": max_rel(a.sink_sum[args.length], b.sink_sum[args.length]),
           "finished": [a.finished[args.length], b.finished[args.length]]}
    for path in (single, multi):
        for leftover in path.parent.glob(path.stem + "*"):
            leftover.unlink()
    atomic_write_text(args.out / "profiler_multi.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(args.out / "profiler_multi.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
