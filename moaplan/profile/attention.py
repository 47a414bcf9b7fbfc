"""The profiling attention: dense causal attention whose backward also emits the |E| summary.

:class:`InfluenceCollector` is an attention function for ``transformers``' ``AttentionInterface``.
Its forward is a custom autograd function that saves ``q, k, v, O`` and the row log-sum-exp;
its backward returns ``dq, dk, dv`` (so earlier layers get the exact upstream gradient) and
adds the layer's blockwise ``|E|`` into the collector's buffers.  :func:`profiling_attention`
switches a model to it for the duration of a ``with`` block.

Two backends compute the same function: ``"torch"`` (blockwise torch, any device and dtype) and
``"triton"`` (the default on CUDA: PyTorch's FlashAttention-2 forward/backward for the output
and the gradients, and the kernel :mod:`moaplan.kernels.influence` for the summary; on the CPU
it runs under ``TRITON_INTERPRET=1`` with the torch attention, which is how it is tested there).

Measured on an H100 (benchmarks/results/h100/profiler.md): computing dq/dk/dv through the public
SDPA (cuDNN) inside this function and recomputing the log-sum-exp was slower and, under
gradient checkpointing, kept every layer's inner SDPA graph alive (+20 GiB at 32K), so the
FlashAttention-2 op, whose log-sum-exp comes for free, is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moaplan.dispatch import attention_switched
from moaplan.errors import ModelError
from moaplan.kernels.common import BACKENDS, use_triton
from moaplan.profile.influence import (
    EPS,
    BlockSummary,
    attention_backward,
    attention_forward,
)


def _repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    return t if group == 1 else t.repeat_interleave(group, 1)


def plain_causal_scale(what: str, query: torch.Tensor, key: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None,
                       kwargs: dict[str, Any]) -> float:
    """The softmax scale of an attention call, after refusing (a :class:`ModelError` naming
    ``what``) anything but whole unpadded sequences under plain causal attention."""
    window = kwargs.get("sliding_window")
    if (window is not None and window < query.shape[2]) or kwargs.get("softcap"):
        raise ModelError(f"{what} supports plain causal attention only (this model uses a "
                         "sliding window shorter than the input, or logit softcapping)")
    if query.shape[2] != key.shape[2] or attention_mask is not None:
        raise ModelError(f"{what} runs whole unpadded sequences without a KV cache")
    return scaling if scaling is not None else query.shape[-1] ** -0.5


def _flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


class _ProfiledAttention(torch.autograd.Function):
    """Dense causal attention; its backward also adds |E| into the collector's summary.

    ``fused``: the summary comes from the Triton kernel, and on a CUDA fp16/bf16 input the
    attention itself from FlashAttention-2 (the aten op, because it returns the row
    log-sum-exp the kernel needs and its backward takes it back).  Otherwise everything is the
    blockwise torch code (``fused`` on the CPU is the Triton interpreter test path).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                collector: InfluenceCollector, layer: int, fused: bool) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        ctx.flash = None
        if fused and _flash_usable(q):
            o, lse, cum_q, cum_k, max_q, max_k, rng, unused, _ = (
                torch.ops.aten._scaled_dot_product_flash_attention(
                    q, _repeat_kv(k, group), _repeat_kv(v, group), 0.0, True, False,
                    scale=scale))
            ctx.flash = (cum_q, cum_k, max_q, max_k, rng, unused)
        else:
            o, lse = attention_forward(q, k, v, scale, collector.block)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.collector, ctx.layer, ctx.fused = scale, collector, layer, fused
        return o

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, o, lse = ctx.saved_tensors
        collector: InfluenceCollector = ctx.collector
        summary = collector.summary(ctx.layer, q.shape[1], q.shape[2], q.device)
        b, hq, n, d = q.shape
        lse = lse[..., :n]
        if ctx.flash is not None:
            group = hq // k.shape[1]
            do = do.contiguous()
            cum_q, cum_k, max_q, max_k, rng, unused = ctx.flash
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                do, q, _repeat_kv(k, group), _repeat_kv(v, group), o, lse, cum_q, cum_k,
                max_q, max_k, 0.0, True, rng, unused, scale=ctx.scale)
            if group > 1:
                dk = dk.reshape(b, -1, group, n, d).sum(2)
                dv = dv.reshape(b, -1, group, n, d).sum(2)
        else:
            dq, dk, dv = attention_backward(q, k, v, o, lse, do, ctx.scale,
                                            None if ctx.fused else summary, collector.block)
        if ctx.fused:
            from moaplan.kernels.influence import influence_summary  # imports triton

            delta = (do.float() * o.float()).sum(-1)
            # Triton launches on the current CUDA device: a layer placed on another GPU
            # (device_map) must make its own device current
            with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
                influence_summary(q, k, v, do.contiguous(), lse, delta, ctx.scale,
                                  collector.block, summary.far, summary.sink, eps=EPS)
        return dq, dk, dv, None, None, None, None


@dataclass
class InfluenceCollector:
    """An attention function that records, per layer, the summary of one length's samples
    (per query head).

    ``summaries[layer]`` accumulates over every backward pass until :meth:`reset`.
    """

    block: int
    num_sink_blocks: int
    backend: str = "auto"
    summaries: dict[int, BlockSummary] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ModelError(f"unknown profiling backend {self.backend!r}; use one of "
                             f"{', '.join(BACKENDS)}")

    def reset(self) -> None:
        self.summaries.clear()

    def summary(self, layer: int, q_heads: int, length: int, device: torch.device
                ) -> BlockSummary:
        """The layer's buffer, one row per query head, created on the layer's device
        (``device_map`` may spread them)."""
        if layer not in self.summaries:
            self.summaries[layer] = BlockSummary.zeros(q_heads, length, self.block,
                                                       self.num_sink_blocks, device)
        return self.summaries[layer]

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None,
                 scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
        scale = plain_causal_scale("profiling", query, key, attention_mask, scaling, kwargs)
        if torch.is_grad_enabled() and query.requires_grad:
            out = _ProfiledAttention.apply(query, key, value, scale, self, module.layer_idx,
                                           use_triton(self.backend, query))
        else:  # no backward follows (a checkpointed layer's first pass): plain attention
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale,
                enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def profiling_attention(model: torch.nn.Module, collector: Callable) -> Iterator[None]:
    """Run ``model``'s attention through ``collector`` (an :class:`InfluenceCollector`, or
    any attention function that records) inside the block, then restore it
    (:func:`moaplan.dispatch.attention_switched`; no mask function: profiling runs whole
    unpadded sequences)."""
    with attention_switched(model, collector):
        yield
