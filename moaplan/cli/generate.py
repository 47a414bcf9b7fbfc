"""``moaplan generate``: greedy text from a model under a plan, with its compressed KV cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moaplan.cli.common import (
    add_device_argument,
    add_force_argument,
    add_json_argument,
    add_model_source_arguments,
    open_model,
    positive_int,
    print_json,
)
from moaplan.errors import DataError

# A prompt file may hold at most this many bytes per position of the model: no tokenizer
# averages that many bytes per token, and a bigger file would only be refused after
# tokenizing it (a 30 MB prompt once took 24 GB before the model saw it).
_BYTES_PER_POSITION = 64


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
    add_device_argument(parser)
    add_force_argument(parser)
    add_json_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moaplan.data.tokens import bos_ids, encode
    from moaplan.io import read_text
    from moaplan.model import check_lengths, max_positions, resolve_device
    from moaplan.plan import load_plan
    from moaplan.runtime import MoaplanCache, apply, greedy_generate, kv_bytes

    plan = load_plan(args.plan)
    device = resolve_device(args.device)
    model, tokenizer = open_model(args, device, "bfloat16" if device.type == "cuda"
                                  else "float32")
    dtype = model.dtype
    apply(model, plan, strict=not args.force)
    if args.prompt_file is not None:
        limit = _BYTES_PER_POSITION * (max_positions(model.config) or 2**20)
        text = read_text(args.prompt_file, "--prompt-file", limit, DataError)
    else:
        text = args.prompt
    ids = torch.tensor([bos_ids(tokenizer) + encode(tokenizer, text)], dtype=torch.long,
                       device=device)
    if ids.shape[1] == 0:
        raise DataError("the prompt is empty and this tokenizer has no beginning-of-sequence "
                        "token: give some text")
    length = ids.shape[1] + args.max_new_tokens
    check_lengths(model.config, [length],
                  f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens")
    cache = MoaplanCache(plan, 1, length, dtype=dtype, device=device)
    start = time.perf_counter()
    out = greedy_generate(model, ids, max_new_tokens=args.max_new_tokens, cache=cache)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    completion = tokenizer.decode(new.tolist(), skip_special_tokens=True)
    dense = kv_bytes(plan, model, length, 1, dtype, dense=True)
    if args.json:
        print_json({"prompt": text, "completion": completion, "prompt_tokens": ids.shape[1],
                    "new_tokens": len(new), "seconds": seconds, "device": str(device),
                    "cache_bytes": cache.nbytes(), "dense_cache_bytes": dense})
        return 0
    print(text + completion)
    print(f"-- {len(new)} new tokens after {ids.shape[1]} prompt tokens in {seconds:.2f} s "
          f"({len(new) / seconds:.1f} tokens/s, prefill included) on {device}; KV cache "
          f"{cache.nbytes() / 2**20:.2f} MiB vs {dense / 2**20:.2f} MiB dense "
          f"({cache.nbytes() / dense:.2f}x)")
    return 0
