"""Running a model under a plan: the reference attention, ``apply``/``remove``, and the
compressed KV cache."""

from moaplan.runtime.apply import apply, remove
from moaplan.runtime.cache import MoaplanCache, attend_cached
from moaplan.runtime.graphed import greedy_generate
from moaplan.runtime.layer import layer_attention
from moaplan.runtime.memory import kv_bytes
from moaplan.runtime.reference import reference_attention, visible

__all__ = ["MoaplanCache", "apply", "attend_cached", "greedy_generate", "kv_bytes",
           "layer_attention", "reference_attention", "remove", "visible"]
