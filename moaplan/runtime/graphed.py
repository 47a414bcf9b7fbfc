"""Greedy generation with every decode step replayed from one CUDA graph.

Eager decoding launches some fifty kernels per layer and token.  With a plan and its
:class:`~moaplan.runtime.cache.MoaplanCache`, the GPU needs far less time for them than the host
needs to launch them (benchmarks/NOTES_decode.md: a 32-layer 8B shape at batch 8 decoded 204
tokens/s eagerly, while its kernels were busy for only 1/551 s per token).

:func:`greedy_generate` prefills the prompt eagerly, runs one decode step, then captures the
next one -- the model's forward on one token per sequence, the cache write, the attention
kernels, the argmax that picks the next token -- and replays that graph for every further token.
The cache keeps its state on the device (buffers, real lengths), so a replay advances it
exactly like an eager step; only its host counters are brought up to date afterwards.  Off CUDA
the same step runs eagerly, so the loop is the same on every device.

The result equals ``model.generate(input_ids, attention_mask=mask, max_new_tokens=n,
do_sample=False)`` on a model with a plan applied: the same positions, the same stopping at
end-of-sequence tokens, padding after them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from moaplan.errors import ModelError
from moaplan.runtime.apply import applied_plan
from moaplan.runtime.cache import MoaplanCache, cache_keyword
from moaplan.runtime.compiled import compiled_layers
from moaplan.runtime.gpu_time import capture_graph


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    cache: MoaplanCache | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    graph: bool | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Greedy decoding of ``input_ids`` ``[B, T]`` (left padding marked by ``attention_mask``)
    on a model that :func:`moaplan.apply` switched to a plan; returns ``[B, T + new]`` token
    ids like ``generate``.  ``cache``: a MoaplanCache to fill (default: one sized for the
    prompt plus ``max_new_tokens``).  ``eos_token_id``/``pad_token_id`` default to the model's
    generation config.  ``graph``: replay decode steps from a CUDA graph (default: on CUDA).
    ``compile``: decode with the model's decoder layers compiled by ``torch.compile``
    (:func:`~moaplan.runtime.compiled.compiled_layers`; the first step compiles them, ~9 s
    for an 8B shape on an H200, so it pays off over long generations).
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ModelError(f"input_ids must be a [batch, tokens] int64 tensor, got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, width = input_ids.shape
    device = input_ids.device
    use_graph = device.type == "cuda" if graph is None else graph
    if use_graph and device.type != "cuda":
        raise ModelError("graph=True replays CUDA graphs: give CUDA input_ids, or graph=False")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if cache is None:
        cache = MoaplanCache(applied_plan(model), batch, width + max_new_tokens,
                             dtype=model.dtype, device=device)
    elif not isinstance(cache, MoaplanCache) or cache.get_seq_length():
        raise ModelError("greedy_generate fills a new, empty MoaplanCache; pass none to get one "
                         "sized for the request")
    eos = _token_list(eos_token_id, model.generation_config.eos_token_id)
    pad = _token_list(pad_token_id, model.generation_config.pad_token_id) or eos or [0]

    with_cache = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    # Prefill, with generate's positions: real tokens count from 0, padding sits at 1.
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits = model(input_ids, attention_mask=mask, position_ids=positions, **with_cache).logits
    ids = logits[:, -1].argmax(-1, keepdim=True)
    tokens = torch.full((batch, max_new_tokens), pad[0], dtype=torch.long, device=device)
    tokens[:, :1] = ids
    pos = mask.long().sum(-1, keepdim=True)  # the position of the token being fed
    column = torch.ones((batch, 1), dtype=torch.long, device=device)  # where the next one goes

    def step() -> None:
        # Every tensor it changes is changed in place, so a graph replay repeats it exactly.
        out = model(ids, position_ids=pos, **with_cache).logits
        chosen = out[:, -1].argmax(-1, keepdim=True)
        tokens.scatter_(1, column, chosen)
        ids.copy_(chosen)
        pos.add_(1)
        column.add_(1)

    remaining = max_new_tokens - 1
    cache.reserve(remaining)  # a clear error now, and no room check on the device later
    with compiled_layers(model) if compile and remaining else nullcontext():
        if use_graph and remaining >= 2:
            replay = capture_decode_step(cache, step)  # runs one step, records the next
            for _ in range(remaining - 1):
                replay()
            cache.count_replayed(remaining - 1)
        else:
            for _ in range(remaining):
                step()
    return torch.cat([input_ids, _stop_at_eos(tokens, eos, pad[0])], 1)


def _token_list(given: int | Sequence[int] | None,
                default: int | Sequence[int] | None) -> list[int]:
    value = default if given is None else given
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(x) for x in value]


def capture_decode_step(cache: MoaplanCache, step: Callable[[], object]) -> Callable[[], None]:
    """:func:`capture_graph` of a decode step through ``cache``: one step runs, the next is
    recorded.  The recording ran the step's Python, which counted a step whose kernels did
    not run; that count is taken back here.  The caller counts its replays with
    ``cache.count_replayed``."""
    replay = capture_graph(step)
    cache.count_replayed(-1)
    return replay


def _stop_at_eos(tokens: torch.Tensor, eos: list[int], pad: int) -> torch.Tensor:
    """``generate``'s stopping: a sequence gets ``pad`` after its first EOS, and the output
    ends at the step where every sequence has produced one."""
    if not eos:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    seen = is_eos.long().cumsum(1)
    tokens = tokens.masked_fill(seen - is_eos.long() > 0, pad)
    done = (seen > 0).all(0)  # [new]: every sequence has ended by this step
    if bool(done.any()):
        tokens = tokens[:, :int(done.nonzero()[0]) + 1]
    return tokens
