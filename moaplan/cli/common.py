"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moaplan.errors import ModelError
from moaplan.io import file_head
from moaplan.rules import MAX_TOKENS, is_density
from moaplan.shape import ModelShape

if TYPE_CHECKING:  # loading imports torch and transformers: not at parse time
    from moaplan.model.loading import ModelSource

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = ("a local model directory, a .gguf file or a Hugging Face hub id (default: the "
              "reference model shipped with moaplan)")


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
    if value > MAX_TOKENS:  # no count or length moaplan takes comes near; int64 math beyond
        raise argparse.ArgumentTypeError(f"expected at most {MAX_TOKENS}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def density_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a density like 0.5, got {text!r}") from None
    if not is_density(value):
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


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, the same default for every command that runs a model: ``auto``, the
    first CUDA GPU when there is one, else the CPU (:func:`moaplan.model.resolve_device`)."""
    parser.add_argument("--device", default="auto",
                        help="torch device: cpu, cuda, cuda:1, ... (default auto: cuda when "
                             "available, else cpu)")


def add_gpus_per_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--gpus-per-model``: how many GPUs one copy of the model is placed on by layers."""
    parser.add_argument("--gpus-per-model", type=positive_int,
                        help="place the model's layers over this many GPUs (under torchrun: "
                             "of each rank's own; default: with --device auto, the fewest "
                             "GPUs whose free memory holds the estimated weights and "
                             "activations of the longest profiled length)")


@dataclass
class TokenRate:
    """Tokens per second over the samples profiled so far, for a progress bar's postfix."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, progress: Any) -> dict[str, Any]:
        """Count a finished sample (a :class:`moaplan.profile.profiler.Progress`)."""
        self.tokens += progress.tokens
        self.seconds += progress.seconds
        return {"length": progress.length,
                "tok_s": f"{self.tokens / max(self.seconds, 1e-9):.0f}"}


def model_source(args: argparse.Namespace) -> ModelSource:
    from moaplan.model.loading import ModelSource

    return ModelSource.of(args.model, revision=args.revision,
                          trust_remote_code=args.trust_remote_code)


ConfigCheck = Callable[[Any], None]  # a command's own checks of a model config


def checked_config(args: argparse.Namespace, profiled: list[int] | None = None,
                   checks: ConfigCheck | None = None) -> Any:
    """The config of ``--model``, refused up front (one line) if a plan cannot drive it, or,
    with ``profiled`` lengths, if the profiler cannot profile it there; then ``checks`` (the
    command's lengths against the positions, head counts ...) run on it, before any weight
    loads."""
    from moaplan.runtime.apply import check_attention_routing

    source = model_source(args)
    config = source.config()
    attention = check_attention_routing(config, trust_remote_code=source.trust_remote_code)
    if profiled:
        attention.check_profiling(profiled)
    if checks is not None:
        checks(config)
    return config


def open_model(args: argparse.Namespace, device: Any = "auto", default_dtype: str = "float32",
               profiled: list[int] | None = None, checks: ConfigCheck | None = None
               ) -> tuple[Any, Any]:
    """``--model`` and its tokenizer, after :func:`checked_config` (before any weight loads),
    in ``--dtype`` (else ``default_dtype``) on ``device``."""
    import torch

    from moaplan.model import load_model, resolve_device

    device = resolve_device(device)  # a device this machine lacks is named before the checks
    checked_config(args, profiled, checks)
    dtype = getattr(torch, args.dtype or default_dtype)
    return load_model(model_source(args), dtype=dtype, device=device)


def open_profiled_model(args: argparse.Namespace, default_dtype: str = "float32",
                        checks: ConfigCheck | None = None) -> tuple[Any, Any, Any]:
    """``--model``, its tokenizer and its :class:`~moaplan.profile.layout.Layout`: as
    :func:`open_model` for profiling ``--lengths``, on ``--device`` or with its layers placed
    over several GPUs (``--gpus-per-model``, or chosen by memory with ``--device auto``)."""
    import torch

    from moaplan.model import resolve_device
    from moaplan.profile.layout import load_laid_out

    resolve_device(args.device)  # a device this machine lacks is named before the checks
    config = checked_config(args, args.lengths, checks)
    return load_laid_out(model_source(args), config, args.lengths,
                         getattr(torch, args.dtype or default_dtype), device=args.device,
                         gpus_per_model=args.gpus_per_model)


def model_shape(args: argparse.Namespace) -> ModelShape:
    """The shape from ``--model``'s config, or from ``--shape L,H,KV,D``."""
    shape = args.shape
    if shape:
        try:
            layers, heads, kv_heads, head_dim = (int(x) for x in shape.split(","))
        except ValueError:
            raise ModelError(
                f"--shape takes LAYERS,HEADS,KV_HEADS,HEAD_DIM, got {shape!r}") from None
        if min(layers, heads, kv_heads, head_dim) < 1 or heads % kv_heads:
            raise ModelError(f"--shape needs positive numbers with HEADS a multiple of "
                             f"KV_HEADS, got {shape!r}")
        return ModelShape(layers, heads, kv_heads, head_dim)
    if args.model is None:
        raise ModelError("give --model (a model directory, .gguf file or hub id) or --shape "
                         "L,H,KV,D")
    return ModelShape.from_config(checked_config(args))


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value:g}")
    return value


def add_force_argument(parser: argparse.ArgumentParser) -> None:
    """``--force``, for commands that apply a plan to a model."""
    parser.add_argument("--force", action="store_true",
                        help="use a plan made for another model of the same shape (its config "
                             "fingerprint differs)")


def json_record(*keys: str) -> Callable[[Path], bool]:
    """Whether a file starts like the JSON (or JSON lines) moaplan writes with these keys."""
    def same_kind(path: Path) -> bool:
        head = file_head(path).decode("utf-8", errors="replace").lstrip()
        return head.startswith("{") and all(f'"{key}":' in head for key in keys)
    return same_kind


def is_study_database(path: Path) -> bool:
    return file_head(path, 16) == b"SQLite format 3\x00"


def is_picture(path: Path) -> bool:
    return file_head(path, 8) == b"\x89PNG\r\n\x1a\n"


def check_head_count(config: Any, count: int, flag: str) -> None:
    """Refuse asking for more KV heads than the model has, before any scoring."""
    shape = ModelShape.from_config(config)
    heads = shape.num_layers * shape.num_key_value_heads
    if count > heads:
        raise ModelError(f"{flag} {count} is more than the model's {heads} KV heads "
                         f"({shape.describe()})")

