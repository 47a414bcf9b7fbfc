"""``moaplan compare-scorers``: how much the top heads of the head scorers overlap."""

from __future__ import annotations

import argparse

from moaplan.cli.common import (
    add_device_argument,
    add_model_source_arguments,
    check_head_count,
    open_model,
    positive_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare-scorers", help="overlap of the top heads of the gradient, retrieval, echo and "
                                "induction scorers",
        description="Rank KV heads by gradient influence (what a 256-recent streaming rule "
                    "drops), retrieval score, echo and induction score, and print the pairwise "
                    "overlap (count and Jaccard) of their top-K heads.  The rankings come from "
                    "profile files (--profiles) or are computed now on the model.")
    add_model_source_arguments(parser)
    parser.add_argument("--profiles", nargs="+", metavar="PROFILE",
                        help="profile files (.safetensors) of any scorers, instead of computing")
    parser.add_argument("--top", type=positive_int, default=8,
                        help="heads per scorer to compare (default 8)")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 2048],
                        help="input lengths when computing (default 1024 2048)")
    parser.add_argument("--samples", type=positive_int, default=4,
                        help="inputs per length and scorer when computing (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.set_defaults(run=run)


def _from_profiles(paths: list[str]) -> dict:
    from pathlib import Path

    from moaplan.profile import load_profile
    from moaplan.profile.compare import profile_rankings

    rankings: dict = {}
    for path in paths:
        for name, scores in profile_rankings(load_profile(path)).items():
            rankings[name if name not in rankings else f"{name} ({Path(path).stem})"] = scores
    return rankings


def run(args: argparse.Namespace) -> int:
    from moaplan.profile.compare import overlap_markdown

    if args.profiles:
        rankings = _from_profiles(args.profiles)
    else:
        from tqdm import tqdm

        from moaplan.data import model_calibration
        from moaplan.model import check_lengths
        from moaplan.profile.compare import scorer_rankings

        def checks(config) -> None:
            check_head_count(config, args.top, "--top")
            check_lengths(config, args.lengths)

        model, tokenizer = open_model(args, device=args.device, profiled=args.lengths,
                                      checks=checks)
        calibration = {n: model_calibration(model, tokenizer, n, args.samples, args.seed)
                       for n in args.lengths}
        with tqdm(total=3 * args.samples * len(set(args.lengths)), unit="input",
                  desc="scoring") as bar:
            rankings = scorer_rankings(model, tokenizer, args.lengths, args.samples,
                                       gradient_samples=calibration, seed=args.seed,
                                       on_sample=lambda progress: bar.update(1))
    print(overlap_markdown(rankings, args.top))
    return 0
