"""Running a model under a plan: the reference attention and ``apply``/``remove``."""

from moaplan.runtime.apply import apply, layer_attention, remove
from moaplan.runtime.reference import reference_attention, visible

__all__ = ["apply", "layer_attention", "reference_attention", "remove", "visible"]
