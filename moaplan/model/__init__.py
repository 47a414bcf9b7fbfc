"""Finding and loading models (every command's loader), and the reference model shipped with
moaplan: a small byte-level Llama that retrieves far back (made by :mod:`moaplan.training`)."""

from moaplan.model.config import reference_config
from moaplan.model.loading import (
    ModelSource,
    check_lengths,
    load_model,
    max_positions,
    reference_model_path,
    resolve_device,
)
from moaplan.model.tokenizer import byte_tokenizer

__all__ = ["ModelSource", "byte_tokenizer", "check_lengths", "load_model", "max_positions",
           "reference_config", "reference_model_path", "resolve_device"]
