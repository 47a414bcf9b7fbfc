"""``moaplan profile``: measure every head's attention influence at several lengths.

``--scorer gradient`` (the default) is the gradient profiler; under ``torchrun`` each rank
profiles its share of the samples (on its own GPU, or its own ``--gpus-per-model`` GPUs) and
rank 0 writes the all-reduced profile (:mod:`moaplan.profile.job`).
``--scorer retrieval`` / ``induction`` score heads on inputs they build themselves (needle
prompts, repeated random tokens) and write the same profile type (:mod:`moaplan.profile.scorers`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moaplan.cli.common import (
    TokenRate,
    add_device_argument,
    add_gpus_per_model_argument,
    add_model_source_arguments,
    checked_config,
    model_source,
    positive_int,
)
from moaplan.cli.search import LENGTHS, SAMPLES, add_objective_argument

SCORER_SAMPLES = 8  # inputs a head scorer builds per length


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile", help="measure per-head attention influence on calibration data",
        description="Run the model densely on calibration samples of each length, backpropagate "
                    "the response-token loss once per sample and store, per (layer, KV head), "
                    "the blockwise influence of dropping attention entries.  Or, with --scorer "
                    "retrieval/induction, score heads by retrieval (copying the needle) or by "
                    "echo + induction attention on repeated random tokens, as a profile the "
                    "optimizer reads the same way.")
    parser.add_argument("--scorer", choices=("gradient", "retrieval", "induction"),
                        default="gradient", help="what measures a head (default gradient)")
    add_model_source_arguments(parser)
    parser.add_argument("--data", help="calibration data file (default: the reference model's "
                                       "own calibration samples)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=LENGTHS,
                        help=f"input lengths in tokens (default: {' '.join(map(str, LENGTHS))}, "
                             "as search)")
    parser.add_argument("--samples", type=positive_int,
                        help=f"samples per length: calibration samples (default {SAMPLES}, as "
                             "search, so that search reuses the profile), or needle prompts or "
                             "repeated sequences for --scorer retrieval / induction (default "
                             f"{SCORER_SAMPLES})")
    # moaplan.profile.profile.BLOCK, spelled out: importing the profile package here would
    # load torch while the parser of every command is built
    parser.add_argument("--block", type=positive_int, default=64,
                        help="block size of the summary in tokens (default 64)")
    parser.add_argument("--out", help="profile file (default: profiles/<model_type>-"
                                      "<fingerprint>[-<scorer>].safetensors, where search and "
                                      "baseline duo look for it)")
    add_objective_argument(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last finished sample")
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="influence implementation (auto: triton on a CUDA GPU)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing (long inputs on large models; with "
                             "--device auto it is turned on when the memory estimate needs it)")
    add_device_argument(parser)
    add_gpus_per_model_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from moaplan.model import check_lengths
    from moaplan.profile.job import JobStart, ProfileJob, run_profile_job

    if args.samples is None:
        args.samples = SAMPLES if args.scorer == "gradient" else SCORER_SAMPLES
    # the config alone names the default output, so a bad path fails before any weight loads
    config = checked_config(args, args.lengths, lambda config: check_lengths(config, args.lengths))
    job = ProfileJob(source=model_source(args), lengths=args.lengths, samples=args.samples,
                     scorer=args.scorer, out=Path(args.out) if args.out else None,
                     data=args.data, seed=args.seed, block=args.block,
                     objective=args.objective, resume=args.resume, backend=args.backend,
                     checkpointing=args.checkpointing, device=args.device,
                     dtype=getattr(torch, args.dtype) if args.dtype else None,
                     gpus_per_model=args.gpus_per_model)
    rate, bars = TokenRate(), []

    def start(started: JobStart) -> None:
        if started.ranks.rank == 0:
            tqdm.write(f"model {started.layout.describe()}", file=sys.stderr)
        bars.append(tqdm(total=started.total, disable=started.ranks.rank != 0,
                         unit="sample" if args.scorer == "gradient" else "input",
                         desc="profiling" if args.scorer == "gradient" else
                         f"{args.scorer} scores"))

    def step(progress) -> None:
        bars[0].set_postfix(**rate.add(progress))
        bars[0].update(1)

    result = run_profile_job(job, config, on_start=start, on_sample=step)
    bars[0].close()
    if result.ranks.rank != 0:
        return 0
    profile = result.profile
    if args.scorer == "gradient":
        print(f"wrote {result.path} ("
              f"{', '.join(f'{n}: {profile.finished[n]}' for n in profile.lengths)} samples)")
        return 0
    for name, scores in profile.head_scores.items():
        best = max(((score, layer, head) for layer, row in enumerate(scores)
                    for head, score in enumerate(row)))
        print(f"{name}: best head (layer {best[1]}, KV head {best[2]}) scores {best[0]:.3f}")
    print(f"wrote {result.path} ({args.scorer} scores, lengths "
          f"{', '.join(map(str, profile.lengths))})")
    return 0
