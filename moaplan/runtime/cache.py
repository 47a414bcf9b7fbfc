"""A KV cache that keeps, for each (layer, KV head), only the sink tokens and the window.

``MoaplanCache(plan, batch_size, max_length, dtype, device)`` is a ``transformers`` ``Cache``:
pass it to ``generate(..., past_key_values=cache)`` (or ``cache=`` on newer releases) of a
model that :func:`moaplan.apply` switched to the plan's attention.  It is sized for requests
of up to ``max_length`` real tokens per sequence (prompt plus new tokens, padding excluded):
head ``h`` of a layer gets ``sink`` slots and a ring of ``span(max_length)`` slots, in one flat
buffer per layer (the layout is described in :mod:`moaplan.kernels.layout`), so memory is
``sum over heads of (sink + span)`` and not ``heads x max_length``.  Positions count real
tokens only (left or right padding is skipped), as in :mod:`moaplan.runtime.apply`.

The cache stores and hands out; it computes no attention.  A model calls
``cache.update(k, v, layer)`` and hands what it returns to the attention function.  ``update``
does not store anything: it stages the chunk and returns it, tagged so that
:func:`cache_step` finds this layer (the attention function gets neither the cache nor the
layer from ``transformers``: the model's attention module takes the cache as a named argument
and does not pass it on).  :func:`moaplan.runtime.cached.attend_cached` then computes the
chunk's attention over what the layer holds and has the layer write the chunk
(:meth:`MoaplanLayer.write_token`, :meth:`MoaplanLayer.write_chunk`).

Rule length: like the dense path, a first prefill's queries all use ``span(N)`` with ``N``
the sequence's real length after it, and every later query (a decode step, a draft being
verified, a second prompt of a chat) uses the span at its own length, exactly as if the
tokens were decoded one by one; ``N <= max_length`` always, so the ring (sized at
``max_length``) holds every key the rule can ask for.

Compensation tokens: for the heads whose rule has ``compensate``, a layer also keeps fp32
running sums of the keys and values of every token the head no longer holds (``key_sum``,
``value_sum``, ``[B, Hkv, D]``): a token is added when the ring overwrites it, or when a chunk
writes past it without storing it.  Their count needs no counter: ``max(0, n - sink - ring)``.
The tokens a query drops are those plus the held ring tokens older than its span, and
``count = max(0, i + 1 - sink - span)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from moaplan.errors import ModelError
from moaplan.kernels.append import append_token, write_slots
from moaplan.kernels.layout import DecodeLayout, RuleTable, decode_layout, slot_positions
from moaplan.model.loading import resolve_device
from moaplan.plan import Plan, as_plan
from moaplan.rules import Rule, cache_slots, rule_arrays
from moaplan.runtime.memory import check_count, check_fits, plan_kv_bytes

_STEP_ATTR = "_moaplan_cache_step"


def cache_keyword(model: Any) -> str:
    """The keyword this model's ``forward`` and ``generate`` take a cache by: ``cache`` on
    newer ``transformers`` releases, ``past_key_values`` (deprecated there) on older ones."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_step(key: torch.Tensor) -> MoaplanLayer | None:
    """The cache layer that returned ``key`` from ``update``, or None for another cache."""
    return getattr(key, _STEP_ATTR, None)


# The most bytes of gathered keys (or values) a chunk's write holds besides the cache (the
# torch write; the kernel gathers none, and the int64 slot indices of a run take about a
# sixth of that at D = 128).
WRITE_BYTES = 256 * 2**20


class MoaplanLayer(CacheLayerMixin):
    """One layer of a :class:`MoaplanCache`: flat K/V buffers ``[B, C, D]`` and counters."""

    is_compileable = False
    is_sliding = False

    def __init__(self, rules: Sequence[Rule], batch_size: int, max_length: int,
                 num_q_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 chunk: int | None = None, headroom: int = 0, window: int | None = None):
        super().__init__()
        self.rules = RuleTable.of(rules, device)
        self.max_length = max_length
        self.num_q_heads = num_q_heads
        self.headroom = headroom
        sinks, rings = cache_slots(rules, max_length)
        # Headroom: ring slots past the span, so that dropping the last ``headroom`` tokens
        # (a rejected draft) leaves every key the next query needs in place.
        rings = np.minimum(rings + headroom, np.maximum(max_length - sinks, 1))
        if window is not None:  # the model's own window: no query sees further back
            rings = np.minimum(rings, window + headroom)
        self.window = window
        self.sinks, self.rings = sinks.tolist(), rings.tolist()
        self.compensate = rule_arrays(rules)["compensate"][:, 0].tolist()
        self._chunk = chunk
        self._lay_out(batch_size, device)
        shape = (batch_size, self.layout.capacity, head_dim)
        # Zeros, not empty: the torch path multiplies masked slots by probability 0.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Sums of the tokens each head no longer holds (compensating heads only read them).
        sums = (batch_size, len(rules), head_dim) if self.layout.has_compensation else (0,)
        self.key_sum = torch.zeros(sums, dtype=torch.float32, device=device)
        self.value_sum = torch.zeros(sums, dtype=torch.float32, device=device)
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size = batch_size
        self.is_initialized = True
        self._reset_counters()

    def _lay_out(self, batch_size: int, device: torch.device | str) -> None:
        # The work list's chunk depends on the batch (enough work items to fill the GPU).
        self.layout: DecodeLayout = decode_layout(self.sinks, self.rings, batch=batch_size,
                                                  device=device, chunk=self._chunk,
                                                  compensate=self.compensate)

    def _reset_counters(self) -> None:
        self.written = 0  # slots the model has passed, padding included (get_seq_length)
        self.n_real = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        self._max_real = 0  # host upper bound of n_real, to check capacity without a sync
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- the transformers CacheLayerMixin interface -------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers are allocated up front (sized by the plan), so there is nothing to do."""

    # Host-side bookkeeping that torch.compile must not trace (see moaplan.runtime.compiled).
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending is not None:
            raise ModelError("a MoaplanCache needs the plan's attention to read it; call "
                             "moaplan.apply(model, plan) before generating with this cache")
        batch, n_kv, _, head_dim = key_states.shape
        if (batch, n_kv, head_dim) != (self.batch_size, self.layout.num_kv_heads,
                                       self.keys.shape[-1]):
            raise ModelError(f"the cache was made for batch {self.batch_size}, "
                             f"{self.layout.num_kv_heads} KV heads, head_dim "
                             f"{self.keys.shape[-1]}; the model gave keys "
                             f"{tuple(key_states.shape)}")
        if key_states.dtype != self.dtype or key_states.device.type != self.device.type:
            raise ModelError(f"the cache holds {self.dtype} on {self.device} but the model "
                             f"computes in {key_states.dtype} on {key_states.device}; make it "
                             "with MoaplanCache(plan, batch_size, max_length, "
                             "dtype=model.dtype, device=model.device)")
        self._pending = (key_states, value_states)
        self.written += key_states.shape[2]
        tagged = key_states.view(key_states.shape)  # a new tensor object that carries the tag
        setattr(tagged, _STEP_ATTR, self)
        return tagged, value_states

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.written + query_length, 0

    def get_seq_length(self) -> int:
        return self.written

    def get_max_length(self) -> int:
        return -1  # bounded in real tokens, not in slots: padding takes no room

    get_max_cache_shape = get_max_length  # its name in transformers 4.x

    @property
    def is_croppable(self) -> bool:
        """Compensation sums cannot give back the tokens a draft pushed into them."""
        return not self.layout.has_compensation

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every sequence (a positive value: keep
        that many slots, transformers 4.x's convention), e.g. a draft assisted decoding
        rejected.  Exact up to the cache's ``headroom``: the ring still holds every key the
        next query sees, and the slots the draft wrote are older than any window reaches."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else self.written - tokens_to_remove
        if remove <= 0:
            return
        if not self.is_croppable:
            raise ModelError("a MoaplanCache with compensation tokens cannot be cropped "
                             "(assisted or prompt-lookup decoding); use a plan without them")
        if remove > self.headroom:
            raise ModelError(f"cannot drop {remove} tokens from a MoaplanCache made with "
                             f"headroom {self.headroom}; make it with headroom >= the longest "
                             "draft")
        self.written -= remove
        self.n_real = (self.n_real - remove).clamp(min=0)
        self._max_real = int(self.n_real.max())

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: sequence ``b`` continues from ``beam_idx[b]``."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(
            torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the sequences ``indices``, in that order."""
        indices = torch.as_tensor(indices, device=self.device)
        self.keys, self.values, self.n_real = (x[indices] for x in (self.keys, self.values,
                                                                     self.n_real))
        if self.layout.has_compensation:
            self.key_sum, self.value_sum = self.key_sum[indices], self.value_sum[indices]
        if len(indices) != self.batch_size:
            self.batch_size = len(indices)
            self._lay_out(self.batch_size, self.device)

    def grown(self, max_length: int) -> MoaplanLayer:
        """This layer in a cache for ``max_length`` tokens, holding what this one holds.

        Exact: a rule's window start ``N - span(N)`` never moves back while spans grow by at
        most one key a token (``beta <= 1``), so no token this ring evicted is ever seen
        again.  Compensation sums count on the ring's size and cannot be carried over."""
        if self.layout.has_compensation or any(
                not rule.full and rule.beta > 1 for rule in self.rules.rules):
            raise ModelError(f"this MoaplanCache holds {self.max_length} tokens per sequence "
                             "and cannot grow (compensation tokens, or a span growing faster "
                             "than the input); make it with a larger max_length")
        new = MoaplanLayer(self.rules.rules, self.batch_size, max_length, self.num_q_heads,
                           self.keys.shape[-1], self.dtype, self.device, self._chunk,
                           self.headroom, self.window)
        for h in range(self.layout.num_kv_heads):
            first, cap = self.layout.head_slots(h)
            pos = slot_positions(self.sinks[h], self.rings[h], self.n_real)  # [B, cap]
            b, j = (pos >= 0).nonzero(as_tuple=True)
            rows = b * new.layout.capacity + new.layout.slots(pos[b, j])[:, h]
            for old, buf in ((self.keys, new.keys), (self.values, new.values)):
                buf.view(-1, buf.shape[-1])[rows] = old[b, first + j]
        new.written, new.n_real, new._max_real = self.written, self.n_real, self._max_real
        return new

    def reset(self) -> None:
        for buf in (self.keys, self.values, self.key_sum, self.value_sum):
            buf.zero_()
        self._reset_counters()

    def nbytes(self) -> int:
        return sum(x.nbytes for x in (self.keys, self.values, self.key_sum, self.value_sum))

    # --- what the attention over the compressed view reads and writes ---------------------
    def take_staged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk ``update`` staged, ``(keys, values)`` ``[B, Hkv, Nq, D]``; the layer
        holds no staged chunk after this."""
        if self._pending is None:
            raise ModelError("attention over a MoaplanCache needs a chunk staged by update() "
                             "first")
        staged, self._pending = self._pending, None
        return staged

    def write_token(self, key: torch.Tensor, value: torch.Tensor,
                    real: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's write, without a host sync: each sequence's token ``[B, Hkv, 1, D]``
        (nothing where ``real`` ``[B]`` is False) and the compensation sums
        (:func:`moaplan.kernels.append.append_token`).  Returns the real lengths after it and
        the heads' spans there, ``[B]`` and ``[B, Hkv]``."""
        n_after = self.n_real + (1 if real is None else real)
        self._check_capacity(1, n_after)
        spans = append_token(key, value, self.keys, self.values, self.key_sum, self.value_sum,
                             self.layout, n_after, real, self.rules)
        self.n_real.copy_(n_after)  # in place, so that a replayed CUDA graph advances it
        return n_after, spans

    def write_chunk(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
                    n_after: torch.Tensor) -> None:
        """Write a chunk ``[B, Hkv, T, D]`` at the positions :meth:`positions` gave, without a
        host sync: every slot whose token after the chunk (its sink's, or the latest of its
        ring's, :meth:`DecodeLayout.held_positions`) is one of the chunk's takes it
        (:func:`moaplan.kernels.append.write_slots`); the others keep theirs."""
        if self.layout.has_compensation:
            p = pos[:, :, None]  # [B, T, 1] against heads [Hkv]
            sink, ring = self.layout.sinks, self.layout.rings
            keep = (p >= 0) & ((p < sink) | (p >= n_after[:, None, None] - ring))
            self._add_evicted(key, value, pos, n_after, skipped=(p >= 0) & ~keep)
        if pos.shape[1] == 0:  # nothing to gather from
            return
        counts = (pos >= 0).cumsum(1)  # real tokens of the chunk up to each of its positions
        for first, stop in self._write_groups(key.shape[0] * key.shape[3] * key.element_size()):
            head, held = self.layout.held_positions(n_after, first, stop)  # [S], [B, S]
            rank = held - self.n_real[:, None]  # the held token is the chunk's rank-th real one
            # Its index in the chunk: the first at which the count of real tokens reaches
            # rank + 1.
            index = torch.searchsorted(counts, (rank + 1).clamp(min=1)).clamp(
                max=pos.shape[1] - 1)
            write_slots(key, value, self.keys, self.values, first, head, rank, index)
        self.n_real = n_after

    def _write_groups(self, slot_bytes: int) -> list[tuple[int, int]]:
        """The slot runs ``[first, stop)`` of consecutive whole heads that :meth:`write_chunk`
        writes at once, ``slot_bytes`` a slot's gathered rows across the batch: as many heads
        as fit in :data:`WRITE_BYTES` (one at least).  Written in place run by run: gathering
        for the whole buffer at once held a copy of it, which at the largest batch that fits
        did not fit beside the cache.  On the H200 a 32K prefill's write took ~0.7 ms a layer
        a head at a time in torch, ~0.4 ms a run of all heads; the kernel alone takes 0.04 ms
        (benchmarks/NOTES_decode.md, stop 29)."""
        runs: list[tuple[int, int]] = []
        for first, cap in self.layout.slot_ranges:
            if runs and (first + cap - runs[-1][0]) * slot_bytes <= WRITE_BYTES:
                runs[-1] = (runs[-1][0], first + cap)
            else:
                runs.append((first, first + cap))
        return runs

    def reserve(self, steps: int) -> None:
        """Check that ``steps`` more tokens per sequence fit, and set the host bound of the
        real lengths to their exact value (one sync), so that the next ``steps`` single-token
        steps check their room without looking at the device, as a CUDA graph must."""
        self._max_real = int(self.n_real.max())
        if self._max_real + steps > self.max_length:
            raise ModelError(f"the MoaplanCache holds {self.max_length} tokens per sequence but "
                             f"generation needs {self._max_real + steps}; make it with a larger "
                             "max_length")

    def count_replayed(self, steps: int) -> None:
        """Bring the host counters up to date after ``steps`` decode steps replayed from a
        CUDA graph, which advance the buffers and real lengths on the device but run no
        Python; ``-1`` undoes the count of a captured step, whose Python ran but whose kernels
        did not (:mod:`moaplan.runtime.graphed`)."""
        self.written += steps
        self._max_real += steps

    def append(self, key: torch.Tensor, value: torch.Tensor,
               chunk_real: torch.Tensor | None = None) -> None:
        """Write keys/values ``[B, Hkv, T, D]`` (after RoPE) without computing attention, e.g.
        to load a prefix computed elsewhere; ``chunk_real`` as in :meth:`positions`."""
        self.update(key, value)
        self._pending = None
        pos, n_after = self.positions(chunk_real, key.shape[0], key.shape[2])
        self.write_chunk(key, value, pos, n_after)

    def positions(self, chunk_real: torch.Tensor | None, batch: int,
                  n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Real-token positions of a chunk of ``n_new`` tokens (``-1`` at padding) and each
        sequence's real length after it; checks the capacity.  ``chunk_real``: bool
        ``[B, n_new]``, False at padding (None: all real)."""
        if chunk_real is None:
            real = torch.ones(batch, n_new, dtype=torch.bool, device=self.device)
        else:
            real = chunk_real.to(device=self.device, dtype=torch.bool)
        pos = torch.where(real, self.n_real[:, None] + real.cumsum(1) - 1, -1)
        n_after = self.n_real + real.sum(1)
        self._check_capacity(n_new, n_after)
        return pos, n_after

    def _check_capacity(self, n_new: int, n_after: torch.Tensor) -> None:
        self._max_real += n_new
        if self._max_real > self.max_length:  # the bound says it may overflow: look exactly
            self._max_real = int(n_after.max())
            if self._max_real > self.max_length:
                raise ModelError(f"the MoaplanCache was sized for {self.max_length} tokens per "
                                 f"sequence but a sequence reached {self._max_real}; make it "
                                 "with a larger max_length")

    def _add_evicted(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
                     n_after: torch.Tensor, skipped: torch.Tensor) -> None:
        """Before a chunk is written: add to the sums the held ring tokens it pushes out and
        its own tokens that are never stored (``skipped``, ``[B, T, Hkv]``)."""
        weight = (skipped & self.layout.compensate.to(torch.bool)).to(torch.float32)
        pushed = {}  # compensating head -> [B, cap] weights of its held tokens pushed out
        for h in (h for h, comp in enumerate(self.compensate) if comp):
            held = slot_positions(self.sinks[h], self.rings[h], self.n_real)
            pushed[h] = ((held >= self.sinks[h])
                         & (held < (n_after - self.rings[h])[:, None])).to(torch.float32)
        for total, new, buf in ((self.key_sum, key, self.keys),
                                (self.value_sum, value, self.values)):
            total += torch.einsum("bth,bhtd->bhd", weight, new.float())
            for h, out in pushed.items():
                first, cap = self.layout.head_slots(h)
                total[:, h] += torch.einsum("bk,bkd->bd", out, buf[:, first:first + cap].float())


class MoaplanCache(Cache):
    """The compressed KV cache of a plan; see the module docstring for the protocol."""

    def __init__(self, plan: Plan | str, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 *, chunk: int | None = None, headroom: int = 0,
                 windows: Sequence[int | None] | None = None):
        """``headroom``: extra ring slots per head so that :meth:`crop` can drop up to that many
        tokens exactly (assisted decoding's rejected drafts); 0 for plain decoding.
        ``windows``: the model's own sliding window per layer (None: full attention), which
        caps that layer's rings; ``model.generate`` under a plan passes them."""
        plan = as_plan(plan)
        batch_size = check_count("batch_size", batch_size)
        max_length = check_count("max_length", max_length)
        if not isinstance(headroom, int) or headroom < 0:
            raise ModelError(f"headroom must be a whole number >= 0, got {headroom!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ModelError(f"dtype must be a floating torch dtype (the model's, "
                             f"model.dtype), got {dtype!r}")
        shape = plan.model
        device = resolve_device(device)
        check_fits(plan_kv_bytes(plan, max_length + headroom, batch_size, dtype), device,
                   f"a MoaplanCache of batch {batch_size} x {max_length} tokens")
        windows = windows or [None] * shape.num_layers
        layers = [MoaplanLayer(plan.rules[layer], batch_size, max_length,
                               shape.num_attention_heads, shape.head_dim, dtype, device, chunk,
                               headroom, windows[layer])
                  for layer in range(shape.num_layers)]
        super().__init__(layers=layers)
        self.plan = plan
        self.max_length = max_length
        self._context: torch.Tensor | None = None  # the token ids generate() left in it

    def reset(self) -> None:
        """Empty the cache for a new request."""
        super().reset()
        self._context = None

    def check_continues(self, input_ids: torch.Tensor) -> None:
        """Refuse ``input_ids`` that do not continue what an earlier ``generate`` left in this
        cache: generate would skip the tokens the cache says it holds and silently answer from
        the old context."""
        held = self.get_seq_length()
        if held == 0 or self._context is None:
            return
        old = self._context[:, :held]
        if (input_ids.shape[0] != old.shape[0] or input_ids.shape[1] <= held
                or not torch.equal(input_ids[:, :held].to(old.device), old)):
            raise ModelError(f"this MoaplanCache already holds {held} tokens of another "
                             "context; call cache.reset() before a new prompt (or pass the "
                             "whole conversation so far as input_ids)")

    def remember(self, sequences: torch.Tensor) -> None:
        """Record the token ids a ``generate`` call ended with (see :meth:`check_continues`)."""
        self._context = sequences.detach()

    def grow(self, max_length: int) -> None:
        """Hold up to ``max_length`` tokens per sequence from now on (a longer continuation of
        a chat), keeping what is cached; see :meth:`MoaplanLayer.grown`."""
        if max_length > self.max_length:
            self.layers = [layer.grown(max_length) for layer in self.layers]
            self.max_length = max_length

    def reserve(self, steps: int) -> None:
        """:meth:`MoaplanLayer.reserve` for every layer."""
        for layer in self.layers:
            layer.reserve(steps)

    def count_replayed(self, steps: int) -> None:
        """:meth:`MoaplanLayer.count_replayed` for every layer."""
        for layer in self.layers:
            layer.count_replayed(steps)

    def nbytes(self) -> int:
        """Bytes of the K/V buffers this cache holds (what :func:`moaplan.kv_bytes` predicts)."""
        return sum(layer.nbytes() for layer in self.layers)
