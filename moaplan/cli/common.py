"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from moaplan.errors import ModelError
from moaplan.plan import ModelShape

if TYPE_CHECKING:  # loading imports torch and transformers: not at parse time
    from moaplan.model.loading import ModelSource

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = ("a local model directory, a .gguf file or a Hugging Face hub id (default: the "
              "reference model shipped with moaplan)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def density_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a density like 0.5, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a density is in (0, 1], got {value}")
    return value


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of text (for scripts)")


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """While ``active``, send everything written to file descriptor 1 (a solver's banner
    printed from C included) to stderr, so that ``--json`` leaves stdout to its record."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def print_json(record: dict) -> None:
    import json

    print(json.dumps(record))


def add_model_source_arguments(parser: argparse.ArgumentParser, *, model_help: str = MODEL_HELP,
                               dtype: bool = True) -> None:
    """``--model`` and how to read it: ``--revision``, ``--trust-remote-code``, ``--dtype``."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a hub model run the code of its own repository")
    if dtype:
        parser.add_argument("--dtype", choices=DTYPES,
                            help="dtype of the weights (default: the command's own)")


def model_source(args: argparse.Namespace) -> ModelSource:
    from moaplan.model.loading import ModelSource

    return ModelSource.of(args.model, revision=args.revision,
                          trust_remote_code=args.trust_remote_code)


def checked_config(args: argparse.Namespace, profiled: list[int] | None = None) -> Any:
    """The config of ``--model``, refused up front (one line) if a plan cannot drive it, or,
    with ``profiled`` lengths, if the profiler cannot profile it there."""
    from moaplan.runtime.apply import check_attention_routing

    source = model_source(args)
    config = source.config()
    attention = check_attention_routing(config, trust_remote_code=source.trust_remote_code)
    if profiled:
        attention.check_profiling(profiled)
    return config


def open_model(args: argparse.Namespace, device: str = "cpu", default_dtype: str = "float32",
               profiled: list[int] | None = None) -> tuple[Any, Any]:
    """``--model`` and its tokenizer, after :func:`checked_config` (before any weight loads),
    in ``--dtype`` (else ``default_dtype``) on ``device``."""
    import torch

    from moaplan.model import load_model

    checked_config(args, profiled)
    dtype = getattr(torch, args.dtype or default_dtype)
    return load_model(model_source(args), dtype=dtype, device=device)


def model_shape(args: argparse.Namespace) -> ModelShape:
    """The shape from ``--model``'s config, or from ``--shape L,H,KV,D``."""
    shape = args.shape
    if shape:
        try:
            layers, heads, kv_heads, head_dim = (int(x) for x in shape.split(","))
        except ValueError:
            raise ModelError(
                f"--shape takes LAYERS,HEADS,KV_HEADS,HEAD_DIM, got {shape!r}") from None
        return ModelShape(layers, heads, kv_heads, head_dim)
    if args.model is None:
        raise ModelError("give --model (a model directory, .gguf file or hub id) or --shape "
                         "L,H,KV,D")
    return ModelShape.from_config(checked_config(args))
