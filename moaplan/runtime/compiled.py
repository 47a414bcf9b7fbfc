"""A model's decoder layers compiled with ``torch.compile``, moaplan's attention left eager.

Besides its weight GEMMs and attention, a transformers decoder layer launches some forty small
kernels per decode step: RMSNorm's casts, power, mean and rsqrt, rotary's slices and
concatenations, SiLU, the residual adds.  On a 32-layer 8B shape at batch 8 and 32K contexts
they took ~2.7 ms of a 12-15 ms step with any plan (benchmarks/NOTES_decode.md), time that a
sparser plan does not shorten.  ``torch.compile`` fuses them into a few kernels a layer.

moaplan's attention (:func:`moaplan.dispatch._dispatch`) and the :class:`MoaplanCache`'s
``update`` are marked ``torch.compiler.disable``: their host logic (routes, layouts, counters)
stays Python, so each layer compiles into the pieces between them.  Every layer is the same
code, but its index is a constant of each piece, so there is one compiled entry per layer
and shape (the recompile limits are raised within the block to allow them).

The same block around a prefill fuses the same kernels over the prompt's tokens (in time to
first token, benchmarks/bench_decode.py).  Shapes follow ``torch.compile``'s default: the
first call of a layer compiles for its shapes, a call with another prompt length recompiles
with the length dynamic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from moaplan.errors import ModelError


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The modules of ``model`` whose classes it names in ``_no_split_modules`` (its decoder
    layers, the unit ``accelerate`` keeps on one device)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ModelError(f"{type(model).__name__} names no decoder layer class "
                         "(_no_split_modules), so its layers cannot be compiled; decode "
                         "without compile")
    return layers


@contextmanager
def compiled_layers(model: Any, *, backend: str = "inductor") -> Iterator[None]:
    """Within the block, every decoder layer of ``model`` runs its forward compiled by
    ``torch.compile`` (``backend``), compiled on their first call (e.g. the first decode
    step: ~9 s for an 8B shape on an H200 with inductor).  The model's own forwards are back
    afterwards."""
    layers = decoder_layers(model)
    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate's hooks
    config = torch._dynamo.config
    # Dynamo's limits count compiled entries per code object and in all; every layer adds
    # its own entries for each shape.
    with config.patch(recompile_limit=config.recompile_limit * len(layers),
                      accumulated_recompile_limit=config.accumulated_recompile_limit
                      * len(layers)):
        try:
            for layer in layers:
                layer.forward = torch.compile(layer.forward, backend=backend)
            yield
        finally:
            for layer, forward in zip(layers, own):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward
