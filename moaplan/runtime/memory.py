"""Predicted KV-cache memory of a plan: what a :class:`~moaplan.runtime.cache.MoaplanCache`
of that size will hold, computed from the rules alone (no tensors allocated)."""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

import torch

from moaplan.errors import ModelError
from moaplan.plan import Plan, as_plan
from moaplan.rules import MAX_TOKENS, cache_slots, rule_arrays


def check_count(name: str, value: Any, limit: int = MAX_TOKENS) -> int:
    """``value`` if it is a whole number in ``[1, limit]``, else a one-line ModelError
    (``max_length=100.5`` or ``batch_size="2"`` must not reach tensor shapes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ModelError(f"{name} must be a whole number, got {value!r}")
    if not 1 <= value <= limit:
        raise ModelError(f"{name} must be in [1, {limit}], got {value}")
    return int(value)


def free_bytes(device: torch.device) -> int:
    """Memory that ``device`` can still give: free GPU memory, or the host's available
    memory (``MemAvailable``, or all physical memory where /proc does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse, before allocating, ``nbytes`` that ``device`` cannot hold."""
    free = free_bytes(device)
    if nbytes > free:
        raise ModelError(f"{what} needs {nbytes / 2**30:.3g} GiB but {device} has "
                         f"{free / 2**30:.3g} GiB free; use a shorter max_length or a "
                         "smaller batch")


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
    plan = as_plan(plan)
    length, batch = check_count("length", length), check_count("batch", batch)
    config, dtype = _config_and_dtype(model_or_config, dtype)
    plan.check_model(config, strict=False)
    return plan_kv_bytes(plan, length, batch, dtype, dense=dense)


def plan_kv_bytes(plan: Plan, length: int, batch: int, dtype: torch.dtype, *,
                  dense: bool = False) -> int:
    """:func:`kv_bytes` without a model to check the plan against."""
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
