"""Running a model under a plan: the reference attention, one layer's attention under its
rules, ``apply``/``remove``, the compressed KV cache, and greedy generation that replays its
decode steps from a CUDA graph."""

from moaplan.kernels.prefill import reference_attention
from moaplan.rules import visible
from moaplan.runtime.apply import apply, remove
from moaplan.runtime.cache import MoaplanCache
from moaplan.runtime.cached import attend_cached
from moaplan.runtime.graphed import greedy_generate
from moaplan.runtime.layer import layer_attention
from moaplan.runtime.memory import kv_bytes

__all__ = ["MoaplanCache", "apply", "attend_cached", "greedy_generate", "kv_bytes",
           "layer_attention", "reference_attention", "remove", "visible"]
