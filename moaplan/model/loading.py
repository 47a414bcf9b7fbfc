"""Finding and loading models: the shipped reference model, or any local causal LM."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moaplan.errors import ModelError

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_model_path() -> Path:
    """The directory of the reference model shipped as package data."""
    return REFERENCE_DIR


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, object]:
    """Load a local causal LM and its tokenizer in eval mode (``None``: the reference model).

    The reference weights are stored in bf16; they are cast to ``dtype`` (float32 by default,
    what a CPU computes fastest and exactly).
    """
    path = Path(path) if path is not None else reference_model_path()
    if not (path / "config.json").is_file():
        raise ModelError(f"no model at {path}: expected a directory with config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load a causal LM from {path}: {first_line}") from err
    return model.to(device).eval(), tokenizer
