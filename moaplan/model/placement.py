"""Layer placement: one model spread over several devices, one run of decoder layers each.

A model too big for one GPU is split by layers (accelerate's dispatch, which ``transformers``'
``from_pretrained(device_map=...)`` also uses): device ``k`` of ``n`` holds layers
``[k L / n, (k + 1) L / n)``, the modules before the layers (the input embeddings) sit on the
first device and those after them (final norm, LM head) on the last, so activations cross
devices ``n - 1`` times per pass.  accelerate's hooks move each module's inputs to its device;
the model computes exactly what it computes on one device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

from moaplan.errors import ModelError

DeviceMap = dict[str, int | str]  # module name -> accelerate device (GPU index or "cpu")


def meta_model(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``config`` on the ``meta`` device: its modules and parameter shapes, no
    memory (what a device map and a weight count are computed from)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def decoder_layers(model: torch.nn.Module) -> str:
    """The name of the ``ModuleList`` holding the model's ``num_hidden_layers`` decoder layers."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name
    raise ModelError(f"cannot find the {count} decoder layers of this "
                     f"{type(model).__name__} to place them on several devices")


def _accelerate_device(device: torch.device) -> int | str:
    return device.index or 0 if device.type == "cuda" else device.type


def layer_device_map(model: torch.nn.Module, devices: Sequence[torch.device | str]) -> DeviceMap:
    """Where each module of ``model`` (real or :func:`meta_model`) goes so that ``devices``
    share its decoder layers evenly (see the module docstring).  Tied input and output
    embeddings stay together on the first device."""
    places = [_accelerate_device(torch.device(d)) for d in devices]
    layers = decoder_layers(model)
    count = model.config.num_hidden_layers
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    device_map: DeviceMap = {}

    def walk(module: torch.nn.Module, prefix: str) -> None:
        after = False  # past the layers in registration order, which is the order they run
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == layers:
                for i in range(count):
                    device_map[f"{full}.{i}"] = places[i * len(places) // count]
                after = True
            elif layers.startswith(full + "."):
                walk(child, full + ".")
                after = True
            elif (tied and child is head) or next(child.parameters(), None) is None:
                # tied embeddings stay together; a module without weights (rotary embeddings,
                # computed from the positions before the first layer) beside the embeddings
                device_map[full] = places[0]
            else:
                device_map[full] = places[-1] if after else places[0]

    walk(model, "")
    return device_map


def place_layers(model: torch.nn.Module, device_map: DeviceMap) -> torch.nn.Module:
    """Dispatch an already built ``model`` by ``device_map`` (accelerate's hooks, attached
    even when every entry is one device, so that the CPU runs the same code path as GPUs)."""
    return dispatch_model(model, device_map=device_map, force_hooks=True)


def process_gpus(count: int, local_rank: int = 0) -> list[torch.device]:
    """The ``count`` GPUs of the process of node-local rank ``local_rank``: GPUs
    ``local_rank * count`` to ``local_rank * count + count - 1`` (one model per process)."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    first = local_rank * count
    if first + count > have:
        raise ModelError(f"{count} GPU(s) per model for local rank {local_rank} needs GPUs "
                         f"{first}..{first + count - 1}; this machine has {have}")
    return [torch.device("cuda", first + i) for i in range(count)]
