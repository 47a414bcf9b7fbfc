"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moaplan.errors import ModelError, one_line
from moaplan.io import file_head
from moaplan.plan import ModelShape
from moaplan.rules import MAX_TOKENS


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
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a density is in (0, 1], got {value}")
    return value


def model_shape(model: str | None, shape: str | None) -> ModelShape:
    """The shape from a local model directory's config, or from ``L,H,KV,D``."""
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
    if model is None:
        raise ModelError("give --model DIR (a local Hugging Face model) or --shape L,H,KV,D")
    if not (Path(model) / "config.json").is_file():
        raise ModelError(f"{model} is not a local model directory (no config.json)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read the config of {model}: {one_line(err, 200)}") from None
    return ModelShape.from_config(config)


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

