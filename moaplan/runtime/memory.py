"""Predicted KV-cache memory of a plan: what a :class:`~moaplan.runtime.cache.MoaplanCache`
of that size will hold, computed from the rules alone (no tensors allocated)."""

from __future__ import annotations

from typing import Any

import torch

from moaplan.errors import ModelError
from moaplan.plan import Plan
from moaplan.rules import cache_slots, rule_arrays


def _config_and_dtype(model_or_config: Any, dtype: torch.dtype | None) -> tuple[Any, torch.dtype]:
    if hasattr(model_or_config, "config") and hasattr(model_or_config, "parameters"):
        config = model_or_config.config
        param = next(model_or_config.parameters(), None)
        default = param.dtype if param is not None else torch.float32
    else:
        config = model_or_config
        default = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        default = getattr(torch, default) if isinstance(default, str) else default
    return config, dtype or default or torch.float32


def kv_bytes(plan: Plan, model_or_config: Any, length: int, batch: int = 1,
             dtype: torch.dtype | None = None, *, dense: bool = False) -> int:
    """Bytes of keys and values a plan's cache holds for ``batch`` sequences of up to
    ``length`` tokens: ``batch x sum over (layer, KV head) of (sink + ring) x head_dim x 2 x
    itemsize`` (:func:`moaplan.rules.cache_slots`: the span at ``length``, capped at
    ``length`` in all), plus, in every layer with a compensating head, float32 sums of evicted
    keys and values for each of its KV heads (``batch x kv_heads x head_dim x 2 x 4``).
    ``dense=True`` gives a dense cache of the same shape (``DynamicCache``).  ``dtype``
    defaults to the model's parameter dtype (or the config's dtype)."""
    if length < 1 or batch < 1:
        raise ModelError(f"length and batch must be >= 1, got {length} and {batch}")
    config, dtype = _config_and_dtype(model_or_config, dtype)
    plan.check_model(config, strict=False)
    shape = plan.model
    sums = 0  # float32 elements of the compensation sums
    if dense:
        slots = shape.num_layers * shape.num_key_value_heads * length
    else:
        rules = plan.flat_rules
        slots = int(sum(x.sum() for x in cache_slots(rules, length)))
        compensating = sum(bool(rule_arrays(layer)["compensate"].any()) for layer in plan.rules)
        sums = compensating * shape.num_key_value_heads * shape.head_dim * 2
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * (slots * shape.head_dim * 2 * itemsize + sums * 4)
