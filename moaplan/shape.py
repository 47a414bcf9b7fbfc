"""The attention shape of a model and the fingerprint of its config.

Plans and profiles both record the model they were made for; this module sits beside
:mod:`moaplan.rules` at the bottom of the package so that the profiler need not import
:mod:`moaplan.plan` for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# The config fields that decide whether a plan (and a profile) fits a model.  Everything
# else in a config (dtype, generation defaults, ...) may change without invalidating a plan.
_FINGERPRINT_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rope_theta", "rope_parameters", "rope_scaling", "sliding_window",
)


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of a model, plus a fingerprint of the config it came from."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = ""
    fingerprint: str | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(num_layers=config.num_hidden_layers, num_attention_heads=heads,
                   num_key_value_heads=kv_heads, head_dim=head_dim,
                   model_type=getattr(config, "model_type", ""),
                   fingerprint=config_fingerprint(config))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def same_shape(self, other: ModelShape) -> bool:
        return (self.num_layers, self.num_attention_heads, self.num_key_value_heads,
                self.head_dim) == (other.num_layers, other.num_attention_heads,
                                   other.num_key_value_heads, other.head_dim)

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_key_value_heads} KV heads "
                f"({self.num_attention_heads} query heads, head_dim {self.head_dim})")


def config_fingerprint(config: Any) -> str:
    """A short hash of the attention-relevant fields of a ``transformers`` config."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: data.get(k) for k in _FINGERPRINT_FIELDS if data.get(k) is not None}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
