"""Finding and loading models: the shipped reference model, a local directory, a GGUF file or
a Hugging Face hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from moaplan.errors import ModelError

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_model_path() -> Path:
    """The directory of the reference model shipped as package data."""
    return REFERENCE_DIR


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
        return ModelError(f"cannot load a causal LM from {where}: {_first_line(err)}")

    def config(self) -> Any:
        """The model's config, without its weights."""
        try:
            return AutoConfig.from_pretrained(self.location, **self.pretrained_kwargs())
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise self._fail(err) from err

    def load(self, dtype: torch.dtype, **kwargs: Any) -> tuple[PreTrainedModel, Any]:
        """The model (``from_pretrained`` with ``kwargs``, SDPA attention) and its tokenizer."""
        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.location, dtype=dtype, attn_implementation="sdpa",
                **self.pretrained_kwargs(), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(self.location, **self.pretrained_kwargs())
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise self._fail(err) from err
        return model.eval(), tokenizer


def load_model(
    path: str | os.PathLike | ModelSource | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer in eval mode (``None``: the reference model).

    ``path`` is a :class:`ModelSource` or what :meth:`ModelSource.of` takes.  The reference
    weights are stored in bf16; they are cast to ``dtype`` (float32 by default, what a CPU
    computes fastest and exactly).
    """
    source = path if isinstance(path, ModelSource) else ModelSource.of(path)
    model, tokenizer = source.load(dtype)
    return model.to(device), tokenizer
