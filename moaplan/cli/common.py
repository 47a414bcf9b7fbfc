"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from moaplan.errors import ModelError
from moaplan.plan import ModelShape


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


def model_shape(model: str | None, shape: str | None) -> ModelShape:
    """The shape from a local model directory's config, or from ``L,H,KV,D``."""
    if shape:
        try:
            layers, heads, kv_heads, head_dim = (int(x) for x in shape.split(","))
        except ValueError:
            raise ModelError(
                f"--shape takes LAYERS,HEADS,KV_HEADS,HEAD_DIM, got {shape!r}") from None
        return ModelShape(layers, heads, kv_heads, head_dim)
    if model is None:
        raise ModelError("give --model DIR (a local Hugging Face model) or --shape L,H,KV,D")
    if not (Path(model) / "config.json").is_file():
        raise ModelError(f"{model} is not a local model directory (no config.json)")
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(model, local_files_only=True))
