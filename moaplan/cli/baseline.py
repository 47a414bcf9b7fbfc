"""``moaplan baseline``: the plans searched plans are compared against, at the same density."""

from __future__ import annotations

import argparse

from moaplan.cli.common import (
    add_json_argument,
    density_value,
    non_negative_int,
    positive_int,
    print_json,
)
from moaplan.cli.search import add_model_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "baseline", help="write a StreamingLLM- or DuoAttention-style plan",
        description="streaming: the same elastic sink + window for every head, at the budget "
                    "at every length.  duo: the heads whose streaming rule drops the most "
                    "influence (from a profile) keep full attention, the rest sink + recent, "
                    "with as many full heads as the budget allows.")
    parser.add_argument("kind", choices=["streaming", "duo"])
    parser.add_argument("--budget", type=density_value, required=True)
    add_model_arguments(parser)
    parser.add_argument("--extend-to", type=positive_int, nargs="*", default=[],
                        help="longer lengths the plan must also meet the budget at")
    parser.add_argument("--sink", type=non_negative_int, default=64,
                        help="sink tokens (default 64)")
    parser.add_argument("--recent", type=positive_int, default=None,
                        help="duo: recent window of streaming heads (default: of 256, 128, "
                             "64 and 32, the feasible one that drops the least influence)")
    parser.add_argument("--out", required=True, help="plan file to write")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moaplan.model import check_lengths
    from moaplan.plan import (
        Budget,
        ModelShape,
        best_duo_plan,
        check_plan_output,
        duo_plan,
        save_plan,
        uniform_plan,
    )

    check_plan_output(args.out)
    budget = Budget(args.density, args.budget)
    lengths = sorted({*args.lengths, *args.extend_to})
    if args.kind == "streaming":
        from moaplan.cli.common import checked_config

        config = checked_config(args, checks=lambda config: check_lengths(config, args.lengths))
        plan = uniform_plan(ModelShape.from_config(config), budget, lengths, args.sink)
    else:
        from moaplan.cli.session import ModelSession
        from moaplan.profile.record import check_profile_output
        from moaplan.search import obtain_profile

        session = ModelSession.open(args, lambda config: check_lengths(config, args.lengths))
        check_profile_output(session.profile_path)
        samples = {n: session.sample_source(n, args.samples, False) for n in args.lengths}
        # the profiler's own block size and rule space, as search's defaults
        profile = obtain_profile(session.model, samples, session.profile_path,
                                 gradient_checkpointing=session.layout.checkpointing)
        if args.recent is None:
            plan = best_duo_plan(profile, budget, lengths, args.sink)
        else:
            plan = duo_plan(profile.model, profile.duo_scores(args.sink, args.recent), budget,
                            lengths, args.sink, args.recent)
    save_plan(plan, args.out)
    if args.json:
        from moaplan.plan.report import plan_record

        print_json({"plan": args.out, **plan_record(plan, lengths)})
    else:
        print(f"wrote {args.out}: {args.kind} plan, {args.density} density {args.budget}")
    return 0
