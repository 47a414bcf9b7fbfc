"""The layout of one layer's compressed cache, and the record of one layer's rules that the
kernel launchers consume.

Storage convention (every kernel and the cache share it): one layer keeps its keys in one flat
buffer ``[B, C, D]`` (values alike).  KV head ``h`` owns slots
``[offset[h], offset[h] + sink[h] + ring[h])``: the first ``sink[h]`` slots hold the tokens at
positions ``0 .. sink-1``, and a ring of ``ring[h]`` slots holds the latest tokens after them,
token ``p >= sink`` in ring slot ``(p - sink) % ring``.  Keys are stored after RoPE, so the
order inside the ring does not matter to attention; only which slots are visible does.

Rules reach the kernels as one :class:`RuleTable` per layer: the prefill launchers read the
sinks and spans at a length from it on the host (:meth:`RuleTable.at`), the decode write
evaluates each head's span at the new length on the device (:meth:`RuleTable.spans` in torch,
:func:`rule_span` in Triton).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moaplan.errors import ModelError
from moaplan.rules import Rule, query_spans, rule_arrays, rule_sinks, rule_spans, span_formula

# Work items (split programs, all sequences together) the default chunk aims at: two per SM
# of the layout's GPU.  On the H200, timed per layer in a stack of layers, batch 1 / 128K ran
# 6% faster with two items per SM (2048-slot chunks) than with one (4096), and batch 8 / 32K
# ran as fast with 288 items of 4096 slots (the cap) as with 544 of 2048
# (benchmarks/results/h200).  A program fills one SM's shared memory with its pipeline (4
# stages of K and V tiles), so the second item per SM mostly evens out the heads' unequal last
# items.  Where the device has no SM count (the CPU), two per SM of an H100 / H200.  Chunks
# are powers of two from 64 (whole key tiles) to _MAX_CHUNK slots, so a large batch still
# splits its long heads.
_ITEMS_PER_SM = 2
_TARGET_ITEMS = 264
_MAX_CHUNK = 4096


@dataclass(frozen=True)
class HeadRules:
    """One layer's rules at one length as host tensors (a prefill launcher plans its tiles
    from them on the CPU, with no device sync): int64 ``sink`` per KV head, ``span`` per KV
    head or, where a rule has ``query_windows``, per query head (the prefill's spans), and
    bool ``compensate`` per KV head (RazorAttention's compensation token; False for full
    rules)."""

    sink: torch.Tensor
    span: torch.Tensor
    compensate: torch.Tensor


@dataclass(frozen=True)
class RuleTable:
    """One layer's rules, one per KV head: the record a plan hands to every kernel launcher.
    The span coefficients sit on a device so that a decode step evaluates ``span(n)`` without
    leaving it."""

    rules: tuple[Rule, ...]
    full: torch.Tensor  # bool [Hkv]
    alpha: torch.Tensor  # float64 [Hkv]
    beta: torch.Tensor  # float64 [Hkv]
    min_span: torch.Tensor  # int64 [Hkv]
    max_span: torch.Tensor  # int64 [Hkv]

    @classmethod
    def of(cls, rules: Sequence[Rule], device: torch.device | str = "cpu") -> RuleTable:
        cols = rule_arrays(rules)
        return cls(tuple(rules), *(torch.from_numpy(cols[name][:, 0]).to(device) for name in
                                   ("full", "alpha", "beta", "min_span", "max_span")))

    def spans(self, n: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv]`` int64 spans at real lengths ``n`` (``[B]``), in torch."""
        return span_formula(n.to(torch.int64)[:, None], self.full, self.alpha, self.beta,
                            self.min_span, self.max_span, xp=torch)

    def at(self, n: int, group: int = 1) -> HeadRules:
        """The sinks and spans at length ``n`` on the host, per query head where a rule has
        ``query_windows`` (``group`` query heads per KV head)."""
        windows = any(rule.query_windows is not None for rule in self.rules)
        spans = query_spans(self.rules, n, group) if windows else rule_spans(self.rules, n)
        return HeadRules(torch.from_numpy(rule_sinks(self.rules, n)), torch.from_numpy(spans),
                         torch.from_numpy(rule_arrays(self.rules)["compensate"][:, 0]))


@triton.jit
def rule_span(n, full, alpha, beta, min_span, max_span):
    """:func:`moaplan.rules.span_formula` in Triton, for one head at an int64 length ``n``."""
    raw = tl.floor(alpha + beta * n.to(tl.float64) + 0.5).to(tl.int64)
    return tl.where(full != 0, n, tl.minimum(tl.maximum(raw, min_span), tl.minimum(max_span, n)))


@dataclass(frozen=True)
class DecodeLayout:
    """The static shape of one layer's compressed cache, and its split-KV work list."""

    offsets: torch.Tensor  # int32 [Hkv]: first slot of each head
    sinks: torch.Tensor  # int32 [Hkv]
    rings: torch.Tensor  # int32 [Hkv]
    items: torch.Tensor  # int32 [n_items, 2]: (KV head, first slot within the head)
    first_item: torch.Tensor  # int32 [Hkv]: the items of head h are first_item[h] + 0..count-1
    item_count: torch.Tensor  # int32 [Hkv]
    chunk: int
    capacity: int  # slots per sequence: sum of sink + ring
    compensate: torch.Tensor  # int32 [Hkv]: 1 for heads with the compensation token
    has_compensation: bool  # any head compensates (host copy, to pick the kernel variant)
    # Host copy of each head's (first slot, number of slots): reading them from the device
    # tensors above would make the host wait for the stream.
    slot_ranges: tuple[tuple[int, int], ...]

    @property
    def num_kv_heads(self) -> int:
        return self.offsets.numel()

    def head_slots(self, head: int) -> tuple[int, int]:
        """``(first slot, number of slots)`` of one KV head (host ints, no device read)."""
        return self.slot_ranges[head]

    def held_positions(self, n: torch.Tensor, first: int = 0,
                       stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For the slots ``first .. stop - 1`` of a sequence's buffer (default: all), each
        one's KV head and the token position it holds after ``n[b]`` real tokens (``-1``
        where empty): int64 ``[S]`` and ``[B, S]``, computed on the layout's device (no host
        sync)."""
        device = self.offsets.device
        caps = (self.sinks + self.rings).to(torch.int64)
        head = torch.repeat_interleave(torch.arange(self.num_kv_heads, device=device), caps,
                                       output_size=self.capacity)[first:stop]
        sink, ring, offset = (x.to(torch.int64)[head] for x in
                              (self.sinks, self.rings, self.offsets))
        slot = torch.arange(first, first + head.numel(), device=device) - offset
        return head, _held_position(slot, sink, ring, n.to(torch.int64)[:, None])

    def slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Slot (within a sequence's buffer) of each head for token positions ``pos``
        ``[...]``: int64 ``[..., Hkv]``."""
        sink, ring, offset = (x.to(torch.int64) for x in (self.sinks, self.rings, self.offsets))
        pos = pos[..., None]
        return offset + torch.where(pos < sink, pos, sink + (pos - sink).clamp(min=0) % ring)


def target_items(device: torch.device | str) -> int:
    """Work items a decode launch on ``device`` aims at: ``_ITEMS_PER_SM`` per SM of a CUDA
    device, else ``_TARGET_ITEMS``."""
    device = torch.device(device)
    if device.type != "cuda":
        return _TARGET_ITEMS
    return _ITEMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def default_chunk(capacity: int, batch: int, items: int = _TARGET_ITEMS) -> int:
    """Slots per work item for ``batch`` sequences of ``capacity`` slots: the power of two
    nearest (in ratio) to what gives ``items`` work items, between 64 and ``_MAX_CHUNK`` (on an
    H200 batch 1 / 128K gets 2048 slots, batch 8 / 32K the cap).  Powers of two, because the
    H200 ran chunks of 1984 and 3968 slots 7-8% slower than 2048 and 4096: with spans of
    whole powers of two (the benchmark's plan) the items then come out whole."""
    per_item = batch * capacity / items
    return min(_MAX_CHUNK, max(64, 2 ** round(math.log2(max(per_item, 1)))))


def decode_layout(sinks: Sequence[int], rings: Sequence[int], *, batch: int = 1,
                  device: torch.device | str = "cpu", chunk: int | None = None,
                  compensate: Sequence[bool] | None = None) -> DecodeLayout:
    """Slot offsets and the work list for heads with ``sinks[h]`` sink slots and a ring of
    ``rings[h]`` slots, split into work items of ``chunk`` slots (default: ``default_chunk``
    for ``batch`` sequences and ``device``'s SMs; a layout runs any batch, ``batch`` only
    picks the chunk);
    ``compensate`` marks the heads with a compensation token."""
    sinks, rings = [int(s) for s in sinks], [int(r) for r in rings]
    flags = [False] * len(sinks) if compensate is None else [bool(c) for c in compensate]
    if len(sinks) != len(rings) or len(flags) != len(sinks) or not sinks:
        raise ModelError(f"need one sink, one ring size and one compensate flag per KV head, "
                         f"got {len(sinks)}, {len(rings)} and {len(flags)}")
    if min(sinks) < 0 or min(rings) < 1:
        raise ModelError(f"sinks must be >= 0 and rings >= 1, got {sinks} and {rings}")
    if batch < 1:
        raise ModelError(f"batch must be >= 1, got {batch}")
    caps = [s + r for s, r in zip(sinks, rings)]
    chunk = default_chunk(sum(caps), batch, target_items(device)) if chunk is None else chunk
    if chunk < 1:
        raise ModelError(f"chunk must be >= 1, got {chunk}")
    items, first, count = [], [], []
    for h, cap in enumerate(caps):
        first.append(len(items))
        items.extend((h, start) for start in range(0, cap, chunk))
        count.append(len(items) - first[-1])
    offsets = [0]
    for cap in caps[:-1]:
        offsets.append(offsets[-1] + cap)

    def ints(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return DecodeLayout(ints(offsets), ints(sinks), ints(rings), ints(items).reshape(-1, 2),
                        ints(first), ints(count), chunk, sum(caps), ints(flags), any(flags),
                        tuple(zip(offsets, caps)))


def slot_positions(sink: int, ring: int, n: torch.Tensor) -> torch.Tensor:
    """Token position held by each slot of one head after ``n[b]`` real tokens: int64
    ``[B, sink + ring]``, ``-1`` for an empty slot."""
    slot = torch.arange(sink + ring, device=n.device)
    return _held_position(slot, sink, ring, n.to(torch.int64)[:, None])


def _held_position(slot: torch.Tensor, sink: torch.Tensor | int, ring: torch.Tensor | int,
                   n: torch.Tensor | int) -> torch.Tensor:
    """Token position held by slot ``slot`` (counted from its head's first slot) of a head
    with ``sink`` sink slots and a ring of ``ring`` after ``n`` real tokens, ``-1`` where
    empty; every argument broadcasts."""
    r = (slot - sink).clamp(min=0)
    newest = torch.as_tensor(n - 1 - sink).clamp(min=0) % ring
    age = (newest - r) % ring  # torch's % of ints is never negative
    pos = torch.where(slot < sink, slot, n - 1 - age)
    filled = torch.where(slot < sink, slot < n,
                         r < torch.as_tensor(n - sink).clamp(min=0).clamp(max=ring))
    return torch.where(filled, pos, -1)
