"""``moaplan generate``: greedy text from a model under a plan, with its compressed KV cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moaplan.cli.common import (
    add_json_argument,
    add_model_source_arguments,
    open_model,
    positive_int,
    print_json,
)
from moaplan.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="greedy text from a model under a plan (compressed KV cache)",
        description="Apply a plan to a model, greedily continue a prompt through the plan's "
                    "compressed KV cache (decode steps replayed from a CUDA graph on a GPU), "
                    "and print the text with its speed and the cache's size against a dense "
                    "cache.")
    parser.add_argument("--plan", required=True, help="plan YAML to apply")
    add_model_source_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64,
                        help="tokens to generate (default: 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moaplan.data.tokens import bos_ids, encode
    from moaplan.plan import load_plan
    from moaplan.runtime import MoaplanCache, apply, greedy_generate, kv_bytes

    if args.prompt_file is not None:
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except OSError as err:
            raise DataError(f"cannot read --prompt-file {args.prompt_file}: "
                            f"{err.strerror}") from None
    else:
        text = args.prompt
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = open_model(args, device, "bfloat16" if device.startswith("cuda")
                                  else "float32")
    dtype = model.dtype
    plan = load_plan(args.plan)
    apply(model, plan)
    ids = torch.tensor([bos_ids(tokenizer) + encode(tokenizer, text)], dtype=torch.long,
                       device=device)
    if ids.shape[1] == 0:
        raise DataError("the prompt is empty and this tokenizer has no beginning-of-sequence "
                        "token: give some text")
    length = ids.shape[1] + args.max_new_tokens
    cache = MoaplanCache(plan, 1, length, dtype=dtype, device=device)
    start = time.perf_counter()
    out = greedy_generate(model, ids, max_new_tokens=args.max_new_tokens, cache=cache)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    completion = tokenizer.decode(new.tolist(), skip_special_tokens=True)
    dense = kv_bytes(plan, model, length, 1, dtype, dense=True)
    if args.json:
        print_json({"prompt": text, "completion": completion, "prompt_tokens": ids.shape[1],
                    "new_tokens": len(new), "seconds": seconds, "device": device,
                    "cache_bytes": cache.nbytes(), "dense_cache_bytes": dense})
        return 0
    print(text + completion)
    print(f"-- {len(new)} new tokens after {ids.shape[1]} prompt tokens in {seconds:.2f} s "
          f"({len(new) / seconds:.1f} tokens/s, prefill included) on {device}; KV cache "
          f"{cache.nbytes() / 2**20:.2f} MiB vs {dense / 2**20:.2f} MiB dense "
          f"({cache.nbytes() / dense:.2f}x)")
    return 0
