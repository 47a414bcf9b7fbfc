"""``moaplan eval``: score a model, dense or under a plan, on a long-context task."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moaplan.cli.common import (
    add_device_argument,
    add_force_argument,
    add_model_source_arguments,
    json_record,
    open_model,
    positive_int,
)

TASKS = ("passkey", "kv", "ppl")


def depth_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a depth like 0.5, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a needle depth is in [0, 1], got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a model (dense or with a plan) on passkey, key-value or perplexity",
        description="Score a model on passkey retrieval, key-value retrieval or held-out "
                    "perplexity over a grid of lengths (and needle depths), print a table and "
                    "optionally write the results as JSON. Samples are drawn from --seed.")
    add_model_source_arguments(parser)
    parser.add_argument("--plan", help="plan YAML to apply (default: dense attention)")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 2048, 4096],
                        help="context lengths in tokens (default: 1024 2048 4096)")
    parser.add_argument("--depths", type=depth_value, nargs="+",
                        default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle depths for passkey/kv, 0 = start, 1 = end")
    parser.add_argument("--samples", type=positive_int, default=8,
                        help="samples per cell (default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    add_device_argument(parser)
    parser.add_argument("--out", help="write the results to this JSON file")
    add_force_argument(parser)
    parser.set_defaults(run=run)


# What an eval result file looks like: the only kind of file --out may replace.
is_eval_result = json_record("model", "plan", "device")


def run(args: argparse.Namespace) -> int:

    from moaplan.eval import kv_accuracy, passkey_accuracy, perplexity
    from moaplan.io import atomic_write_text, check_output
    from moaplan.model import check_lengths, reference_model_path

    if args.out:
        check_output(args.out, "eval result file", is_eval_result)
    model, tokenizer = open_model(args, device=args.device,
                                  checks=lambda config: check_lengths(config, args.lengths))
    device = model.device
    if args.plan:
        from moaplan.runtime import apply

        apply(model, args.plan, strict=not args.force)
    start = time.perf_counter()
    common = dict(lengths=args.lengths, samples=args.samples, seed=args.seed,
                  batch_size=args.batch_size)
    if args.task == "ppl":
        result = perplexity(model, tokenizer, **common)
    else:
        score = passkey_accuracy if args.task == "passkey" else kv_accuracy
        result = score(model, tokenizer, depths=args.depths, **common)
    seconds = time.perf_counter() - start
    attention = f"plan {args.plan}" if args.plan else "dense attention"
    print(f"{args.task} on {args.model or 'the reference model'}, {attention} "
          f"({seconds:.1f} s on {device})")
    print(result.table())
    if args.out:
        record = {
            "model": str(args.model or reference_model_path()),
            "plan": args.plan,
            "device": str(device),
            "seconds": round(seconds, 2),
            **result.to_dict(),
        }
        atomic_write_text(Path(args.out), json.dumps(record, indent=1))
        print(f"wrote {args.out}")
    return 0
