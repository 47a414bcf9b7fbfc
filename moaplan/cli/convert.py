"""``moaplan convert``: import a MoA plan JSON or DuoAttention gates as a moaplan YAML plan."""

from __future__ import annotations

import argparse

from moaplan.cli.common import (
    add_model_source_arguments,
    finite_float,
    model_shape,
    non_negative_int,
    positive_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="import a MoA or DuoAttention plan",
        description="Turn MoA's plan JSON (alphas/betas per query head, 64 sinks) or "
                    "DuoAttention's full_attention_heads.tsv into a moaplan YAML plan.")
    parser.add_argument("source", choices=["moa", "duo"], help="the format of INPUT")
    parser.add_argument("input", help="the file to import")
    parser.add_argument("--out", required=True, help="the YAML plan to write")
    add_model_source_arguments(parser, model_help="the model the plan is for: a local "
                               "directory, a .gguf file or a hub id", dtype=False)
    parser.add_argument("--shape", help="or the model's LAYERS,HEADS,KV_HEADS,HEAD_DIM")
    parser.add_argument("--threshold", type=finite_float,
                        help="duo: gate above this = full head")
    parser.add_argument("--sparsity", type=finite_float,
                        help="duo: share of heads made streaming")
    parser.add_argument("--sink", type=non_negative_int, default=64,
                        help="duo: sink tokens (default 64)")
    parser.add_argument("--recent", type=positive_int, default=256,
                        help="duo: recent window (256)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moaplan.plan import check_plan_output, import_duo, import_moa, save_plan

    check_plan_output(args.out)
    shape = model_shape(args)
    if args.source == "moa":
        plan = import_moa(args.input, shape)
    else:
        if args.threshold is None and args.sparsity is None:
            args.sparsity = 0.5
        plan = import_duo(args.input, shape, threshold=args.threshold, sparsity=args.sparsity,
                          sink=args.sink, recent=args.recent)
    save_plan(plan, args.out)
    print(f"wrote {args.out}: {shape.describe()}")
    return 0
