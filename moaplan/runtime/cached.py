"""Attention over a :class:`~moaplan.runtime.cache.MoaplanCache`: the plan's attention function
calls, before its dense path::

    out = attend_cached(query, key, attention_mask, scaling)   # [B, Hq, Nq, D] or None

which finds the cache layer that staged ``key`` (:func:`moaplan.runtime.cache.cache_step`),
computes the chunk's attention over what the layer holds plus the chunk, and has the layer
write the chunk.  A multi-token chunk (a prefill, or a second prompt in a multi-turn chat) is
attended first and written after, because the ring may have to evict keys that the chunk's
first queries still see; a single-token chunk (decode) is written first (on the GPU in one
launch, :mod:`moaplan.kernels.append`) and read by the split-KV decode kernel.
"""

from __future__ import annotations

import torch

from moaplan.kernels.common import use_triton
from moaplan.kernels.decode import chunk_attention, decode_attention
from moaplan.runtime.cache import MoaplanLayer, cache_step
from moaplan.runtime.layer import PLAIN, NativeAttention, layer_attention, real_token_attention


def attend_cached(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  scale: float | None = None,
                  native: NativeAttention = PLAIN) -> torch.Tensor | None:
    """``[B, Hq, Nq, D]`` through the compressed view when ``key`` came from a
    :class:`MoaplanCache`, else None (dense path).

    ``attention_mask`` is what :func:`moaplan.runtime.apply.real_token_mask` gives: None
    (every token real) or bool ``[B, 1, Nq, Nk]`` whose padding rows are all False.
    """
    layer = cache_step(key)
    if layer is None:
        return None
    real = None if attention_mask is None else attention_mask[:, 0].any(2)
    return attend(layer, query, scale=scale, chunk_real=real, native=native)


def attend(layer: MoaplanLayer, query: torch.Tensor, *, scale: float | None = None,
           chunk_real: torch.Tensor | None = None,
           native: NativeAttention = PLAIN) -> torch.Tensor:
    """Attention of the staged chunk's queries ``[B, Hq, Nq, D]`` over ``layer``'s cache plus
    the chunk; then the chunk is written.  ``chunk_real``: bool ``[B, Nq]``, False at padding
    (those rows come out as zeros).  ``native``: the model's own window and soft-capping,
    which only the multi-token path implements (a single token with them takes that path
    too).  Returns ``[B, Hq, Nq, D]``."""
    key, value = layer.take_staged()
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    plain = native == PLAIN and (not use_triton("auto", query) or native.kernel_ready(query))
    if query.shape[2] == 1 and plain:
        real = None if chunk_real is None else chunk_real[:, 0].to(torch.bool)
        n_after, spans = layer.write_token(key, value, real)
        out = decode_attention(query[:, :, 0], layer.keys, layer.values, layer.layout, n_after,
                               spans, scale=scale, evicted=(layer.key_sum, layer.value_sum))
        if real is not None:
            out = out.masked_fill(~real[:, None, None], 0.0)
        return out[:, :, None]
    pos, n_after = layer.positions(chunk_real, query.shape[0], query.shape[2])
    out = _chunk(layer, query, key, value, pos, n_after, scale, native,
                 unpadded=chunk_real is None)
    layer.write_chunk(key, value, pos, n_after)
    return out


def _chunk(layer: MoaplanLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           pos: torch.Tensor, n_after: torch.Tensor, scale: float,
           native: NativeAttention, *, unpadded: bool) -> torch.Tensor:
    """Multi-token chunk: its queries over the cached keys plus the chunk's own keys;
    ``unpadded``: the chunk is known on the host to have no padding (then a first prefill's
    positions are ``0 .. T-1`` without looking at the device)."""
    batch, _, n_new, _ = query.shape
    empty = layer.written == n_new  # nothing was cached before this chunk
    if empty and use_triton("auto", query):  # a first prefill: the block-sparse kernel
        if unpadded or _chunk_is_plain(pos):
            return layer_attention(layer.rules, query, key, value, None, scale=scale,
                                   native=native)
        real = pos >= 0
        return real_token_attention(layer.rules, query, key, value, real, real, scale=scale,
                                    native=native)
    if empty:  # a first prefill: every query at N, the real length after the chunk
        spans = layer.rules.spans(n_after)[:, None, :].expand(-1, n_new, -1)
    else:  # a continuation: each query at its own length, exactly as if decoded one by one
        spans = layer.rules.spans((pos + 1).clamp(min=1).reshape(-1)).view(batch, n_new, -1)
    return chunk_attention(query, key, value, pos, spans, layer.layout, scale,
                           cached=None if empty else (layer.keys, layer.values, layer.n_real),
                           evicted=(layer.key_sum, layer.value_sum), window=native.window,
                           softcap=native.softcap)


def _chunk_is_plain(pos: torch.Tensor) -> bool:
    """True when every sequence's chunk is real tokens ``0 .. T-1`` (no padding, empty cache);
    a host check of a small tensor."""
    return bool((pos == torch.arange(pos.shape[1], device=pos.device)).all())
