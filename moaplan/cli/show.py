"""``moaplan show``: summarise a plan (table + span heatmap) or a profile (influence plot)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moaplan.cli.common import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show", help="summarise a plan or a profile",
        description="Print a plan's rules and densities per layer and write a heatmap of its "
                    "spans, or plot a profile's influence against distance for every head.")
    parser.add_argument("path", help="a plan (.yaml) or a profile (.safetensors)")
    parser.add_argument("--lengths", type=positive_int, nargs="+",
                        help="lengths to report densities at (default: the plan's lengths)")
    parser.add_argument("--png", help="where to write the picture (default: PATH with .png)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moaplan.cli.common import is_picture
    from moaplan.io import check_output

    path = Path(args.path)
    png = check_output(args.png or path.with_suffix(".png"), "picture", is_picture)
    if path.suffix == ".safetensors":
        from moaplan.profile import show_profile

        show_profile(path, png)
        print(f"wrote {png}")
        return 0
    from moaplan.plan import load_plan
    from moaplan.plan.report import plan_table, plot_spans

    plan = load_plan(path)
    lengths = args.lengths or plan.lengths or [4096]
    print(f"{path}: {plan.model.describe()}"
          + (f", budget {plan.budget.kind} {plan.budget.value}" if plan.budget else ""))
    print(plan_table(plan, lengths))
    plot_spans(plan, max(lengths), png)
    print(f"wrote {png}")
    return 0
