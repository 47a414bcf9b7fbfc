"""Finding and loading models: the shipped reference model, a local directory, a GGUF file or
a Hugging Face hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moaplan.errors import ModelError, one_line

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_model_path() -> Path:
    """The directory of the reference model shipped as package data."""
    return REFERENCE_DIR


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device this machine has (``"auto"`` or None: the first GPU if
    there is one, else the CPU)."""
    if device is None or device == "auto":
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


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, in the terms of ``from_pretrained``: a local directory or a
    hub id (``location``), a GGUF file in that directory (``gguf_file``; transformers reads it
    with the ``gguf`` package), a hub ``revision``, and whether the model's own code may run."""

    location: str
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def of(cls, model: str | os.PathLike | None, *, revision: str | None = None,
           trust_remote_code: bool = False) -> ModelSource:
        """``model``: a local directory with ``config.json``, a ``.gguf`` file, a hub id such
        as ``org/name``, or None for the reference model shipped with moaplan."""
        if model is None:
            return cls(str(reference_model_path()))
        path = Path(model).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"no GGUF file at {path}")
            return cls(str(path.parent), path.name, revision, trust_remote_code)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"no model at {path}: expected a directory with config.json")
            return cls(str(path), None, revision, trust_remote_code)
        # A hub id is "name" or "org/name"; anything else that does not exist is a typo'd path.
        if path.exists() or path.is_absolute() or str(model).startswith(".") or len(path.parts) > 2:
            raise ModelError(f"no model at {path}: expected a directory with config.json, a "
                             ".gguf file or a Hugging Face hub id")
        return cls(str(model), None, revision, trust_remote_code)

    @property
    def name(self) -> str:
        """A short name for file names: the GGUF file's stem or the directory / repo name."""
        return Path(self.gguf_file).stem if self.gguf_file else Path(self.location).name

    def pretrained_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every ``from_pretrained`` of this source takes."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs

    def _fail(self, err: Exception) -> ModelError:
        where = self.location + (f"/{self.gguf_file}" if self.gguf_file else "")
        reason = one_line(err) or type(err).__name__
        return ModelError(f"cannot load a causal LM from {where}: {reason}")

    def config(self) -> Any:
        """The model's config, without its weights."""
        try:
            return AutoConfig.from_pretrained(self.location, **self.pretrained_kwargs())
        except (OSError, ValueError, KeyError, TypeError, ImportError, SafetensorError) as err:
            raise self._fail(err) from err

    def load(self, dtype: torch.dtype, **kwargs: Any) -> tuple[PreTrainedModel, Any]:
        """The model (``from_pretrained`` with ``kwargs``, SDPA attention) and its tokenizer."""
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.location, dtype=dtype, attn_implementation="sdpa",
                **self.pretrained_kwargs(), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(self.location, **self.pretrained_kwargs())
        except (OSError, ValueError, KeyError, TypeError, ImportError, SafetensorError) as err:
            raise self._fail(err) from err
        return model.eval(), tokenizer


def load_model(
    path: str | os.PathLike | ModelSource | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    *,
    device_map: str | dict[str, int | str] | None = None,
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer in eval mode (``None``: the reference model).

    ``path`` is a :class:`ModelSource` or what :meth:`ModelSource.of` takes.  The reference
    weights are stored in bf16; they are cast to ``dtype`` (float32 by default, what a CPU
    computes fastest and exactly).  ``device="auto"`` (or None) picks the first GPU, if any;
    a ``device_map`` (``from_pretrained``'s: ``"auto"``, or module name -> device such as
    :func:`moaplan.model.placement.layer_device_map`'s) spreads the model instead, loading
    each weight straight onto its device.
    """
    source = path if isinstance(path, ModelSource) else ModelSource.of(path)
    if device_map is not None:
        model, tokenizer = source.load(dtype, device_map=device_map)
        _check_causal(model, Path(source.location))
        return model, tokenizer
    device = resolve_device(device)
    model, tokenizer = source.load(dtype)
    _check_causal(model, Path(source.location))
    return model.to(device), tokenizer
