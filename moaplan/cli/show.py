"""``moaplan show``: summarise a plan (table + span heatmap) or a profile (influence plot)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moaplan.cli.common import add_json_argument, positive_int, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show", help="summarise a plan or a profile",
        description="Print a plan's rules and densities per layer (with --png, also a "
                    "heatmap of its spans), or a profile's lengths and samples (with --png, "
                    "also its influence against distance for every head).")
    parser.add_argument("path", help="a plan (.yaml) or a profile (.safetensors)")
    parser.add_argument("--lengths", type=positive_int, nargs="+",
                        help="lengths to report densities at (default: the plan's lengths)")
    parser.add_argument("--png", help="also write a picture to this file")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moaplan.cli.common import is_picture
    from moaplan.io import check_output

    path = Path(args.path)
    png = check_output(args.png, "picture", is_picture) if args.png else None
    if path.suffix == ".safetensors":
        from moaplan.profile import load_profile, show_profile

        profile = load_profile(path)
        samples = {str(n): int(profile.finished[n]) for n in profile.lengths}
        if args.json:
            print_json({"profile": str(path), "model": profile.model.describe(),
                        "block": profile.block, "samples": samples})
        else:
            print(f"{path}: {profile.model.describe()}, block {profile.block}, samples per "
                  f"length {', '.join(f'{n}: {c}' for n, c in samples.items())}")
        if png is not None:
            show_profile(path, png)
            if not args.json:
                print(f"wrote {png}")
        return 0
    from moaplan.plan import load_plan
    from moaplan.plan.report import plan_record, plan_table, plot_spans

    plan = load_plan(path)
    lengths = args.lengths or plan.lengths or [4096]
    if args.json:
        print_json({"plan": str(path), **plan_record(plan, lengths)})
    else:
        print(f"{path}: {plan.model.describe()}"
              + (f", budget {plan.budget.kind} {plan.budget.value}" if plan.budget else ""))
        print(plan_table(plan, lengths))
    if png is not None:
        plot_spans(plan, max(lengths), png)
        if not args.json:
            print(f"wrote {png}")
    return 0
