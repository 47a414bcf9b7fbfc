"""The one way moaplan switches a model's attention, and switches it back: ``apply``/``remove``
(a plan's attention), the profiler and the head scorers (their recording attentions) and the
routing check (its probe) all go through :func:`switch_attention` and :func:`restore_attention`.

Only public ``transformers`` interfaces are used: ``AttentionInterface.register`` (and
``AttentionMaskInterface.register`` for a mask function) and ``model.set_attn_implementation``.
``transformers`` has no public way to take an entry out of those registries again, and its
mask machinery only looks at the class-wide one, so moaplan registers a fixed set of names,
each bound to one module-level function, :func:`_dispatch`: registering it again changes
nothing, and repeated switches leave the registries as the first one left them.  What differs
between switches (a plan's attention, a profiler's collector) is the *attention* callable,
which is stored on the model's own modules (a plain attribute, never a parameter or buffer)
for :func:`_dispatch` to call, and removed again by :func:`restore_attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from moaplan.errors import ModelError

# The registry names moaplan uses: with its real-token mask function (a plan's attention and
# the routing probe), and without a mask function (the profiler's recording attentions, which
# run whole unpadded sequences and so are handed no mask).
MASKED = "moaplan_masked"
UNMASKED = "moaplan_unmasked"
_ATTENTION = "_moaplan_attention"  # the attribute of every module that holds the callable


@dataclass(frozen=True)
class AttentionSwitch:
    """What :func:`switch_attention` changed on ``model``, for :func:`restore_attention`: the
    implementation name it had, and the attention callable its modules held (None: none, a
    switch that was not nested in another)."""

    model: Any
    previous_name: str
    previous_attention: Callable | None


# Never traced by torch.compile: the attention callables run their own kernels and host logic
# (moaplan.runtime.compiled compiles the rest of a layer around this call).
@torch.compiler.disable
def _dispatch(module: Any, *args: Any, **kwargs: Any) -> Any:
    """The function registered under :data:`MASKED` and :data:`UNMASKED`: the attention
    callable the model was switched to, called like any ``AttentionInterface`` function."""
    attention = getattr(module, _ATTENTION, None)
    if attention is None:
        raise ModelError("this model was switched to moaplan's attention by name only; use "
                         "moaplan.apply(model, plan)")
    return attention(module, *args, **kwargs)


def switch_attention(model: Any, attention: Callable, *, mask: Callable | None = None
                     ) -> AttentionSwitch:
    """Make every attention call of ``model`` go to ``attention`` (an ``AttentionInterface``
    function); with ``mask`` (an ``AttentionMaskInterface`` function), the model builds its
    attention masks with it.  Returns what :func:`restore_attention` needs to undo it."""
    name = UNMASKED if mask is None else MASKED
    AttentionInterface.register(name, _dispatch)
    if mask is not None:
        AttentionMaskInterface.register(name, mask)
    switch = AttentionSwitch(model, model.config._attn_implementation,
                             getattr(model, _ATTENTION, None))
    for module in model.modules():
        setattr(module, _ATTENTION, attention)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        restore_attention(switch)
        raise ModelError(f"{type(model).__name__} does not compute attention through "
                         "transformers' AttentionInterface (its attention cannot be switched), "
                         "so moaplan cannot change it")
    return switch


def restore_attention(switch: AttentionSwitch) -> None:
    """Undo :func:`switch_attention`: the model's previous implementation, and its modules
    without moaplan's attention callable (or with the one an enclosing switch gave them)."""
    model = switch.model
    model.set_attn_implementation(switch.previous_name)
    for module in model.modules():
        if switch.previous_attention is None:
            delattr(module, _ATTENTION)
        else:
            setattr(module, _ATTENTION, switch.previous_attention)


@contextmanager
def attention_switched(model: Any, attention: Callable, *, mask: Callable | None = None
                       ) -> Iterator[None]:
    """:func:`switch_attention` for the duration of a ``with`` block."""
    switch = switch_attention(model, attention, mask=mask)
    try:
        yield
    finally:
        restore_attention(switch)
