"""``moaplan profile``: measure every head's attention influence at several lengths.

``--scorer gradient`` (the default) is the gradient profiler; under ``torchrun`` each rank
profiles its share of the samples (one GPU per rank) and rank 0 writes the all-reduced profile.
``--scorer retrieval`` / ``induction`` score heads on inputs they build themselves (needle
prompts, repeated random tokens) and write the same profile type (:mod:`moaplan.profile.scorers`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moaplan.cli.common import (
    add_device_argument,
    add_model_source_arguments,
    checked_config,
    open_model,
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
    # moaplan.profile.record.BLOCK, spelled out: importing the profile package here would
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
                        help="gradient checkpointing (long inputs on large models)")
    add_device_argument(parser)
    parser.add_argument("--device-map", default=None,
                        help="'auto' spreads a large model over the visible GPUs (instead of "
                             "--device)")
    parser.set_defaults(run=run)


def _load(args: argparse.Namespace, local_rank: int):
    import torch

    from moaplan.model import resolve_device

    if args.device_map is not None:  # spread over the GPUs: bf16, as on one GPU
        return open_model(args, None, "bfloat16", profiled=args.lengths,
                          device_map=args.device_map)
    # under torchrun, auto is this rank's GPU (one GPU per rank)
    device = resolve_device(f"cuda:{local_rank}" if args.device == "auto"
                            and torch.cuda.is_available() else args.device)
    return open_model(args, device, "bfloat16" if device.type == "cuda" else "float32",
                      profiled=args.lengths)


def _samples(args: argparse.Namespace, model, tokenizer) -> dict:
    from moaplan.data.calibration import sample_source

    # search's own source of profiling samples, so that search finds this profile's data
    source = sample_source(model, tokenizer, args.data, args.lengths, args.seed)
    return {n: source(n, args.samples, False) for n in args.lengths}


def _score(args: argparse.Namespace, loaded: tuple, out: Path) -> int:
    from tqdm import tqdm

    from moaplan.profile import save_profile
    from moaplan.profile.scorers import score_profile

    model, tokenizer = loaded
    with tqdm(total=args.samples * len(set(args.lengths)), unit="input",
              desc=f"{args.scorer} scores") as bar:
        profile = score_profile(model, tokenizer, args.scorer, args.lengths, args.samples,
                                block=args.block, seed=args.seed,
                                on_sample=lambda progress: bar.update(1))
    save_profile(profile, out)
    for name, scores in profile.head_scores.items():
        best = max(((score, layer, head) for layer, row in enumerate(scores)
                    for head, score in enumerate(row)))
        print(f"{name}: best head (layer {best[1]}, KV head {best[2]}) scores {best[0]:.3f}")
    print(f"wrote {out} ({args.scorer} scores, lengths {', '.join(map(str, profile.lengths))})")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from moaplan.errors import ProfileError
    from moaplan.model import check_lengths
    from moaplan.profile import checkpoint_path
    from moaplan.profile.profiler import profile_to_file
    from moaplan.profile.record import (
        check_profile_output,
        default_profile_path,
        sink_blocks,
    )
    from moaplan.rules import RuleSpace
    from moaplan.shape import ModelShape

    if args.samples is None:
        args.samples = SAMPLES if args.scorer == "gradient" else SCORER_SAMPLES
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # the config alone names the default output, so a bad path fails before any weight loads
    config = checked_config(args, args.lengths, lambda config: check_lengths(config, args.lengths))
    out = check_profile_output(args.out or default_profile_path(
        ModelShape.from_config(config), args.scorer))
    if args.scorer != "gradient":
        if world > 1 or args.data or args.resume:
            raise ProfileError(f"--scorer {args.scorer} builds its own inputs and runs in one "
                               "process: drop --data, --resume and torchrun")
        return _score(args, _load(args, local_rank), out)

    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    sink_blocks(RuleSpace(), args.block)  # the profiler's rule space: fail before any work
    model, tokenizer = _load(args, local_rank)
    check_profile_output(checkpoint_path(out, rank, world))
    samples = _samples(args, model, tokenizer)
    total = sum(len(range(rank, len(s), world)) for s in samples.values())
    bar = tqdm(total=total, unit="sample", disable=rank != 0, desc="profiling")
    tokens, seconds = 0, 0.0

    def step(progress) -> None:
        nonlocal tokens, seconds
        tokens, seconds = tokens + progress.tokens, seconds + progress.seconds
        bar.set_postfix(length=progress.length, tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        bar.update(1)

    profile = profile_to_file(model, samples, out, resume=args.resume, block=args.block,
                              backend=args.backend, objective=args.objective,
                              gradient_checkpointing=args.checkpointing, on_sample=step)
    bar.close()
    if rank == 0:
        print(f"wrote {out} ({', '.join(f'{n}: {profile.finished[n]}' for n in profile.lengths)}"
              " samples)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
