"""moaplan: per-head sparse attention plans for Hugging Face causal LMs.

``moaplan.apply(model, "plan.yaml")`` makes a ``transformers`` model follow a plan;
``moaplan.remove(model)`` undoes it.  The heavy imports (torch, transformers) happen on first
use, so the command line starts fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "apply": "moaplan.runtime.apply",
    "remove": "moaplan.runtime.apply",
    "MoaplanCache": "moaplan.runtime.cache",
    "greedy_generate": "moaplan.runtime.graphed",
    "kv_bytes": "moaplan.runtime.memory",
    "load_plan": "moaplan.plan",
    "save_plan": "moaplan.plan",
    "Plan": "moaplan.plan",
    "Rule": "moaplan.rules",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moaplan' has no attribute {name!r}")
