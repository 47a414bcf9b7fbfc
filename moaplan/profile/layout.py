"""Where a profiled model runs: one device, or its decoder layers placed over several GPUs
(:mod:`moaplan.model.placement`), and whether the profile needs gradient checkpointing.

Chosen from the config alone, before any weight loads: the weights (counted on a ``meta``
copy of the model) plus an estimate of the activations one profiled sample keeps, against
the free memory of the GPUs this process may use.  Without torchrun that is every visible
GPU; under torchrun, each of the ``W`` ranks of a host owns ``GPUs / W`` of them, so sharding
and data parallelism combine (rank ``r`` placing its model on GPUs ``r n .. r n + n - 1``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moaplan.errors import ModelError
from moaplan.model.loading import ModelSource, load_model, resolve_device
from moaplan.model.placement import layer_device_map, meta_model, process_gpus
from moaplan.profile.profiler import head_rows
from moaplan.shape import ModelShape

# Share of a GPU's free memory an estimate may fill: the allocator's fragmentation, cuBLAS
# workspaces and the Triton kernels' own buffers are not in the estimate.
MARGIN = 0.9
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one profiled sample needs: ``weights`` and ``stored`` activations are split over
    the GPUs the layers are placed on; ``transient`` (one layer's backward, the LM head's
    chunk of logits) is needed on each GPU in turn, as the pass reaches its layers."""

    weights: int
    stored: int
    transient: int

    def per_gpu(self, gpus: int) -> int:
        return -(-(self.weights + self.stored) // gpus) + self.transient


def estimate_memory(config: Any, weights: int, length: int, dtype: torch.dtype,
                    checkpointing: bool) -> MemoryEstimate:
    """The memory of profiling one ``length``-token sample of the model of ``config`` whose
    parameters take ``weights`` bytes.

    Per token and layer, in the model's dtype: autograd keeps about ``5 h + 3 q + 3 kv + 4 m``
    values of a layer (norm inputs, q / k / v / o, attention output, the MLP's gate, up,
    activation and product; ``h`` hidden, ``q`` / ``kv`` query / KV widths, ``m`` MLP width),
    and differentiating one layer holds about ``6 h + 4 q + 4 kv + 6 m`` (those plus their
    gradients).  With checkpointing only each layer's input is kept.  For the Llama-3-8B shape
    at 32K with checkpointing this gives 31.2 GiB; 29.9 GiB was measured on an H100
    (benchmarks/results/h100/profiler.md).
    """
    width = dtype.itemsize
    shape = ModelShape.from_config(config)
    hidden = config.hidden_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    vocab = config.vocab_size
    # logits of one chunk of response tokens in the model's dtype, and three float32 copies
    # (logits, softmax, their gradient)
    head = min(length, head_rows(vocab)) * vocab * (width + 12)
    per_token = length * width
    layers = config.num_hidden_layers
    if checkpointing:
        stored = layers * per_token * hidden
    else:
        stored = layers * per_token * (5 * hidden + 3 * q + 3 * kv + 4 * mlp)
    transient = per_token * (6 * hidden + 4 * q + 4 * kv + 6 * mlp) + head
    return MemoryEstimate(weights, stored, transient)


@dataclass(frozen=True)
class Layout:
    """The devices a profiled model's layers are placed on (one: no sharding), whether the
    profile uses gradient checkpointing, and the estimate it was chosen by (None when the
    devices were given, not chosen)."""

    devices: tuple[torch.device, ...]
    checkpointing: bool
    estimate: MemoryEstimate | None = None
    free: int | None = None  # the least free memory among the devices, bytes

    @property
    def sharded(self) -> bool:
        return len(self.devices) > 1

    def describe(self) -> str:
        where = (f"layers placed over {', '.join(map(str, self.devices))}" if self.sharded
                 else f"on {self.devices[0]}")
        if self.estimate is not None and self.free is not None:
            where += (f" (estimated {self.estimate.per_gpu(len(self.devices)) / GIB:.1f} GiB "
                      f"per GPU, {self.free / GIB:.1f} GiB free)")
        return where + (", gradient checkpointing" if self.checkpointing else "")


def fewest_gpus(estimates: dict[bool, MemoryEstimate], free: Sequence[int]
                ) -> tuple[int, bool] | None:
    """``(GPUs, checkpointing)``: the fewest of the GPUs with ``free`` bytes (in order) that
    hold the estimate of ``estimates[checkpointing]``, without checkpointing where that fits
    (checkpointing costs a second forward; another GPU costs a model replica fewer); None if
    none do."""
    for gpus in range(1, len(free) + 1):
        for checkpointing in sorted(estimates):
            if estimates[checkpointing].per_gpu(gpus) <= MARGIN * min(free[:gpus]):
                return gpus, checkpointing
    return None


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s parameters in ``dtype`` (tied ones counted once)."""
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def choose_layout(config: Any, lengths: Sequence[int], dtype: torch.dtype, *,
                  device: str | torch.device | None = "auto", gpus_per_model: int | None = None,
                  checkpointing: bool = False, local_rank: int = 0, local_world: int = 1,
                  skeleton: Callable[[], torch.nn.Module] | None = None) -> Layout:
    """The layout this process profiles ``config``'s model in (see the module docstring).

    ``gpus_per_model`` places the layers over that many GPUs of this rank, unconditionally.
    Otherwise ``device`` ``"auto"`` on a machine with GPUs takes the fewest of this rank's GPUs
    (:func:`fewest_gpus`) that hold the estimate at the longest length, turning gradient
    checkpointing on when that is what fits; any other ``device`` is used as it is.
    ``skeleton`` makes the model on the ``meta`` device (default :func:`meta_model`), called
    only when the weights must be counted.
    """
    if gpus_per_model is not None:
        return Layout(tuple(process_gpus(gpus_per_model, local_rank)), checkpointing)
    auto = device in (None, "auto") and torch.cuda.is_available()
    if not auto:
        return Layout((resolve_device(device),), checkpointing)
    per_rank = torch.cuda.device_count() // local_world
    if per_rank < 1:
        raise ModelError(f"{local_world} torchrun ranks on a host with "
                         f"{torch.cuda.device_count()} GPU(s): at most one rank per GPU")
    gpus = process_gpus(per_rank, local_rank)
    weights = weight_bytes(skeleton() if skeleton is not None else meta_model(config), dtype)
    estimates = {ckpt: estimate_memory(config, weights, max(lengths), dtype, ckpt)
                 for ckpt in sorted({checkpointing, True})}
    free: list[int] = []
    fit = None
    for gpu in gpus:  # one GPU more at a time: asking a GPU its free memory claims a context
        free.append(torch.cuda.mem_get_info(gpu)[0])
        fit = fewest_gpus(estimates, free)
        if fit is not None:
            break
    if fit is None:
        need = estimates[True].per_gpu(len(gpus)) / GIB
        raise ModelError(f"profiling {max(lengths)} tokens needs about {need:.0f} GiB per GPU "
                         f"even with its layers over the {len(gpus)} GPU(s) of this process "
                         f"({min(free) / GIB:.0f} GiB free): profile shorter --lengths, give "
                         "each model more GPUs (fewer torchrun ranks), or force a count with "
                         "--gpus-per-model")
    count, ckpt = fit
    return Layout(tuple(gpus[:count]), ckpt, estimates[ckpt], min(free[:count]))


def default_dtype(device: str | torch.device | None, gpus_per_model: int | None
                  ) -> torch.dtype:
    """The profiler's dtype when none is asked for: bfloat16 on GPUs, float32 on the CPU."""
    on_gpu = gpus_per_model is not None or resolve_device(device).type == "cuda"
    return torch.bfloat16 if on_gpu else torch.float32


def load_laid_out(source: ModelSource, config: Any, lengths: Sequence[int],
                  dtype: torch.dtype | None = None, **placement: Any
                  ) -> tuple[torch.nn.Module, Any, Layout]:
    """The model of ``source`` (whose config is ``config``) and its tokenizer, loaded straight
    onto the devices of :func:`choose_layout` (``placement`` are its keywords), and the layout.
    ``dtype`` None is :func:`default_dtype`."""
    if dtype is None:
        dtype = default_dtype(placement.get("device", "auto"), placement.get("gpus_per_model"))
    # the weight count and a device map are read off it, and only then is it made
    skeleton = functools.cache(lambda: meta_model(config, source.trust_remote_code))
    layout = choose_layout(config, lengths, dtype, skeleton=skeleton, **placement)
    if layout.sharded:
        model, tokenizer = load_model(source, dtype,
                                      device_map=layer_device_map(skeleton(), layout.devices))
    else:
        model, tokenizer = load_model(source, dtype, layout.devices[0])
    return model, tokenizer, layout
