"""The reference model: a small byte-level Llama that retrieves far back, shipped with moaplan."""

from moaplan.model.config import reference_config
from moaplan.model.loading import ModelSource, load_model, reference_model_path
from moaplan.model.tokenizer import byte_tokenizer

__all__ = ["ModelSource", "byte_tokenizer", "load_model", "reference_config",
           "reference_model_path"]
