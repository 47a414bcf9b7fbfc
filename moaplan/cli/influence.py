"""``moaplan influence``: AttentionInfluence data scores, as JSONL."""

from __future__ import annotations

import argparse

from moaplan.cli.common import (
    add_device_argument,
    add_force_argument,
    add_model_source_arguments,
    check_head_count,
    json_record,
    non_negative_int,
    open_model,
    positive_int,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "influence", help="score data by the loss increase when retrieval heads are masked",
        description="For each sample of --data, the relative increase of its loss "
                    "(masked - dense) / dense when heads are masked: by a plan (--plan), or the "
                    "top-K retrieval heads keeping only a short local window (--heads K).  "
                    "Writes one JSON line per sample: index, score, dense_loss, masked_loss.")
    parser.add_argument("--data", required=True,
                        help="JSONL with prompt/response (loss on the response) or plain text "
                             "(cut into windows of --length tokens, loss on every token)")
    mask = parser.add_mutually_exclusive_group(required=True)
    mask.add_argument("--plan", help="plan YAML whose rules are the mask")
    mask.add_argument("--heads", type=positive_int, metavar="K",
                      help="mask the K KV heads with the highest retrieval scores")
    parser.add_argument("--scores", metavar="PROFILE",
                        help="--heads: rank heads by this profile (any scorer; default: "
                             "retrieval scores computed now)")
    parser.add_argument("--window", type=positive_int, default=64,
                        help="--heads: keys a masked head keeps (default 64)")
    parser.add_argument("--sink", type=non_negative_int, default=4,
                        help="--heads: sink tokens a masked head keeps (default 4)")
    parser.add_argument("--score-lengths", type=positive_int, nargs="+", default=[2048],
                        help="--heads without --scores: needle prompt lengths (default 2048)")
    parser.add_argument("--score-samples", type=positive_int, default=4,
                        help="--heads without --scores: needle prompts per length (default 4)")
    add_model_source_arguments(parser)
    parser.add_argument("--length", type=positive_int, default=4096,
                        help="longest sample in tokens; longer pairs are cut (default 4096)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N samples")
    parser.add_argument("--out", default="influence.jsonl",
                        help="JSONL file to write (default influence.jsonl)")
    add_device_argument(parser)
    add_force_argument(parser)
    parser.set_defaults(run=run)


# What --out may replace: a file of influence scores written before.
is_score_file = json_record("index", "score")


def _mask_plan(args: argparse.Namespace, model, tokenizer):
    from moaplan.eval.data_influence import retrieval_mask_plan
    from moaplan.plan import load_plan
    from moaplan.rules import Rule

    if args.plan:
        plan = load_plan(args.plan)
        plan.check_model(model.config, strict=not args.force)
        return plan
    return retrieval_mask_plan(model, tokenizer, args.heads,
                               Rule.window(args.window, sink=args.sink), scores=args.scores,
                               lengths=args.score_lengths, samples=args.score_samples)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moaplan.data import load_calibration
    from moaplan.eval.data_influence import influence_scores, write_scores
    from moaplan.io import check_output
    from moaplan.model import check_lengths

    check_output(args.out, "influence score file", is_score_file)

    def checks(config) -> None:
        check_lengths(config, [args.length], "--length")
        if args.heads is not None:
            check_head_count(config, args.heads, "--heads")
            if not args.scores:
                check_lengths(config, args.score_lengths, "--score-lengths")

    model, tokenizer = open_model(args, device=args.device, checks=checks)
    samples = load_calibration(args.data, tokenizer, args.length, args.limit)
    plan = _mask_plan(args, model, tokenizer)
    with tqdm(total=2 * len(samples), unit="pass", desc="influence") as bar:
        scores = influence_scores(model, samples, plan, on_sample=lambda: bar.update(1),
                                  strict=not args.force)
    write_scores(args.out, scores)
    masked = plan.provenance.get("masked_heads")
    what = f"heads {masked} masked" if masked is not None else f"plan {args.plan}"
    print(f"wrote {args.out}: {len(scores)} samples scored, {what}")
    return 0
