"""Finding and loading models: the shipped reference model, or any local causal LM."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moaplan.errors import ModelError, one_line

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_model_path() -> Path:
    """The directory of the reference model shipped as package data."""
    return REFERENCE_DIR


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device this machine has (None: the first GPU if there is one)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ModelError(f"device {device} is not available: this machine has {count} "
                             "CUDA GPU(s); use --device cpu")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise ModelError(f"device {device} is not available on this machine") from None
    return device


def max_positions(config) -> int | None:
    """The longest input the model was built for (``max_position_embeddings``), if it says."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_lengths(config, lengths, what: str = "--lengths") -> None:
    """Refuse, before any allocation, a length past the model's positions."""
    limit = max_positions(config)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long:
        raise ModelError(f"{what}: {max(too_long)} tokens is more than the model's "
                         f"{limit} positions (max_position_embeddings)")


def _check_causal(model: PreTrainedModel, path: Path) -> None:
    """Refuse models whose attention sees later tokens (BERT loads as a "causal LM" too)."""
    causal = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None),
                                                                 bool)]
    if getattr(model.config, "is_encoder_decoder", False) or not all(causal):
        raise ModelError(f"{path} is not a causal (decoder-only) language model: its attention "
                         "sees later tokens; moaplan plans causal attention")


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
) -> tuple[PreTrainedModel, object]:
    """Load a local causal LM and its tokenizer in eval mode (``None``: the reference model).

    The reference weights are stored in bf16; they are cast to ``dtype`` (float32 by default,
    what a CPU computes fastest and exactly).  ``device=None`` picks the first GPU, if any.
    """
    path = Path(path) if path is not None else reference_model_path()
    device = resolve_device(device)
    if not (path / "config.json").is_file():
        raise ModelError(f"no model at {path}: expected a directory with config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise ModelError(f"cannot load a causal LM from {path}: "
                         f"{one_line(err) or type(err).__name__}") from err
    _check_causal(model, path)
    return model.to(device).eval(), tokenizer
