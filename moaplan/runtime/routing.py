"""Never slower than dense: which kernel computes each query head of a prefill.

A layer whose heads all see every key is dense attention, which SDPA (cuDNN on Hopper) does
faster than the block-sparse kernel; a layer of narrow windows is the kernel's.  Between the
two, a layer can send its full heads to SDPA and its windowed heads to the kernel (the
"split" route), at the cost of gathering the full heads' queries and keys and a second launch.
:func:`choose_route` sends an all-full layer to SDPA and otherwise predicts the sparse and
split routes' times with a :class:`CostModel` and takes the faster; :func:`routed_attention`
runs it, on CUDA (the Triton kernel) and elsewhere (the windowed torch attention or the
reference stand in for the kernel), with the same result either way.

The cost model is measured once per GPU (:func:`calibrate`: the GPU's time of a few SDPA and
kernel calls and a copy, replayed from CUDA graphs, a few seconds) and kept on disk, keyed by
the card and the torch and Triton versions, under ``$MOAPLAN_CACHE_DIR`` (default
``~/.cache/moaplan``).  On the CPU, and during a CUDA-graph capture before the card is measured,
:data:`DEFAULT_COST` stands in: an H200's figures, rounded (benchmarks/results/h200/layers.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moaplan.io import atomic_write_text
from moaplan.kernels.common import use_triton
from moaplan.kernels.prefill import (
    SHORT_REACH,
    default_config,
    pack_heads,
    per_query_head,
    shared_rule_heads,
    sparse_attention,
)
from moaplan.rules import block_attention_density
from moaplan.runtime.gpu_time import graph_medians
from moaplan.runtime.windowed import windowed_attention

log = logging.getLogger(__name__)

ROUTES = ("sparse", "dense", "split")


# The lengths calibrate measures at: one where the kernel takes its short tiles, one long.
CALIBRATION_LENGTHS = (4096, 16384)


@dataclass(frozen=True)
class CostModel:
    """Prefill speeds of one GPU, enough to predict each route's time.

    ``sdpa_tflops``: dense causal SDPA (``4 * D * N(N+1)/2`` FLOPs a query head) as the
    dense route calls it; ``efficiency_short`` / ``efficiency_long``: the block-sparse
    kernel's speed on the tiles it visits relative to that call's (tile density x T_SDPA /
    T_kernel), in its short (reach <= 4096 keys) and long programs; ``copy_tbps``: device
    copy bandwidth (bytes read plus written); ``gqa_native``: SDPA's ``enable_gqa`` is
    faster than repeating the keys per query head in the call (else the dense route repeats
    them, a copy); ``split_short`` / ``split_long``: the split route's measured time over its
    prediction from the rest (two launches that each fill the GPU less than one, the
    gathers) at the :data:`CALIBRATION_LENGTHS`.
    """

    sdpa_tflops: float = 565.0
    efficiency_short: float = 0.89
    efficiency_long: float = 1.0
    copy_tbps: float = 3.9
    gqa_native: bool = True
    split_short: float = 1.2
    split_long: float = 1.02

    def efficiency(self, head_dim: int, reach: int) -> float:
        return self.efficiency_short if _short(head_dim, reach) else self.efficiency_long

    def split(self, head_dim: int, n: int) -> float:
        """The split factor at length ``n``.  Its excess over 1 is the two launches' tails,
        each about one program long (O(N)) against the layer's O(N^2) work, so it shrinks as
        1/N from the length it was measured at."""
        short = _short(head_dim, n)
        factor = self.split_short if short else self.split_long
        return 1 + (factor - 1) * CALIBRATION_LENGTHS[0 if short else 1] / n


def _short(head_dim: int, reach: int) -> bool:
    """Whether the kernel's programs for this reach are short ones, whose tiles
    :func:`default_config` picks apart (head_dim 128 only: other head dims have one shape)."""
    return head_dim == 128 and reach <= SHORT_REACH


DEFAULT_COST = CostModel()


@dataclass(frozen=True)
class Route:
    """How one layer's prefill is computed: ``kind`` is one of :data:`ROUTES`; ``dense``
    marks the query heads SDPA computes (all for ``dense``, none for ``sparse``);
    ``predicted_s`` the cost model's time of each route."""

    kind: str
    dense: tuple[bool, ...]
    predicted_s: dict[str, float]


def choose_route(sink: Sequence[int], span: Sequence[int], n: int, head_dim: int,
                 cost: CostModel = DEFAULT_COST, group: int = 1) -> Route:
    """The fastest route for a whole-prompt prefill of ``n`` tokens whose query heads have
    ``sink`` and ``span`` (one value per query head, ``group`` query heads per KV head).  A
    head is full when its sinks and window cover every key (``sink + span >= n``).
    Remembered per layer and length, so the host does the arithmetic once."""
    return _choose_route(tuple(int(x) for x in sink), tuple(int(x) for x in span), n,
                         head_dim, cost, group)


@functools.lru_cache(maxsize=4096)
def _choose_route(sink: tuple[int, ...], span: tuple[int, ...], n: int, head_dim: int,
                  cost: CostModel, group: int) -> Route:
    if len(sink) % group:
        group = 1
    sink = np.minimum(np.asarray(sink, dtype=np.int64), n)
    span = np.minimum(np.asarray(span, dtype=np.int64), n)
    full = sink + span >= n
    head_s = 4 * head_dim * n * (n + 1) / 2 / (cost.sdpa_tflops * 1e12)  # SDPA, one head
    head_bytes = n * head_dim * 2 * 2  # one head's [n, D] bf16 tensor, read and written

    def ours(heads: np.ndarray) -> float:
        if not heads.any():
            return 0.0
        tiles, reach = _kernel_tiles(sink, span, heads, n, head_dim, group)
        return float(tiles.sum()) * head_s / cost.efficiency(head_dim, reach)

    def sdpa(n_heads: int, gathered: bool) -> float:
        # Repeating keys and values per query head (two tensors), unless SDPA does GQA;
        # a split also gathers the queries and scatters the outputs.
        copies = (0 if cost.gqa_native else 2) + (2 if gathered else 0)
        return n_heads * (head_s + copies * head_bytes / (cost.copy_tbps * 1e12))

    predicted = {"sparse": ours(np.ones_like(full)), "dense": sdpa(len(full), False)}
    if full.any() and not full.all():
        predicted["split"] = (sdpa(int(full.sum()), True) + ours(~full)) * cost.split(
            head_dim, n)
    if not full.all():
        del predicted["dense"]  # windowed heads need the kernel
    # An all-full layer is dense attention, SDPA's: the kernel on all-full tiles measures
    # 0.95-1.0x of it (H200), and a calibration's few percent of noise must not tip it over.
    kind = "dense" if full.all() else min(predicted, key=predicted.get)
    dense = full if kind == "split" else np.full_like(full, kind == "dense")
    return Route(kind, tuple(bool(x) for x in dense), predicted)


def _kernel_tiles(sink: np.ndarray, span: np.ndarray, heads: np.ndarray, n: int,
                  head_dim: int, group: int) -> tuple[np.ndarray, int]:
    """The share of the causal tiles the kernel visits for each of ``heads`` (a mask over
    the layer's query heads, whose rules ``sink``/``span`` are capped at ``n``), under the
    tiles one launch of them takes (by their widest reach; a program's rows are ``block_m /
    p`` queries of each of the ``p`` heads it packs, :func:`pack_heads`), and that reach.
    The launch sees the other heads with no sink and no window, which pack with none of
    these."""
    reach = int(min((sink + span)[heads].max(), n))
    # The launch's heads: these, and the others with nothing to see.
    launch_sink, launch_span = np.where(heads, sink, 0), np.where(heads, span, 0)
    shared = shared_rule_heads(launch_sink.tolist(), launch_span.tolist(), group, n)
    cfg = default_config(head_dim, reach, shared)
    rows = np.empty(len(sink), dtype=np.int64)
    for pack in pack_heads(launch_sink.tolist(), launch_span.tolist(), group, cfg):
        rows[pack] = cfg.block_m // len(pack)
    tiles = np.empty(len(sink))
    for block_m in np.unique(rows[heads]):
        some = heads & (rows == block_m)
        tiles[some] = block_attention_density(sink[some], span[some], n, int(block_m),
                                              cfg.block_n, cfg.masked_n)
    return tiles[heads], reach


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """Maximal ``[start, stop)`` runs of True in ``flags``."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        elif flag:
            runs.append((i, i + 1))
    return runs


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
                    gqa_native: bool) -> torch.Tensor:
    """Causal SDPA of ``[B, Hq, N, D]`` queries on ``[B, Hkv, N, D]`` keys (GQA by SDPA's own
    ``enable_gqa``, or by repeating the keys per query head)."""
    group = q.shape[1] // k.shape[1]
    if gqa_native or group == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=group > 1)
    k, v = (x.repeat_interleave(group, 1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def routed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
    *, scale: float | None = None, q_offset: int | torch.Tensor = 0,
    seq_lens: torch.Tensor | None = None, compensate: torch.Tensor | None = None,
    route: str | None = None,
) -> torch.Tensor:
    """``sparse_attention``'s contract (on the CPU, the reference's), computed by the fastest
    route: a whole-prompt prefill (``q_offset`` the int 0, as many queries as keys, no
    padding) may go to SDPA in part or whole (:func:`choose_route`); anything else runs the
    block-sparse kernel.  ``sink``/``span`` are host tensors, one value per KV head or per
    query head.  ``route`` forces one of :data:`ROUTES` where it applies (tests)."""
    kwargs = dict(scale=scale, q_offset=q_offset, seq_lens=seq_lens, compensate=compensate)
    n, n_q_heads = k.shape[2], q.shape[1]
    whole = (isinstance(q_offset, int) and q_offset == 0 and seq_lens is None
             and q.shape[2] == n)
    if not whole:
        return _sparse(q, k, v, sink, span, **kwargs)
    sinks, spans = (per_query_head(x, k.shape[1], n_q_heads // k.shape[1]).reshape(-1).numpy()
                    for x in (sink, span))
    cost = cost_model(q.device) if q.is_cuda else DEFAULT_COST
    chosen = choose_route(sinks, spans, n, q.shape[3], cost, n_q_heads // k.shape[1])
    if route is not None and route != chosen.kind:
        full = tuple(bool(x) for x in np.minimum(sinks, n) + np.minimum(spans, n) >= n)
        chosen = Route(route, full if route == "split" else (route == "dense",) * n_q_heads,
                       {})
        if route == "dense" and not all(full):
            raise ValueError("the dense route needs every head to see every key")
    if not any(chosen.dense):
        return _sparse(q, k, v, sink, span, **kwargs)
    if all(chosen.dense):
        return dense_attention(q, k, v, scale=scale, gqa_native=cost.gqa_native)
    return _split_attention(q, k, v, sinks, spans, chosen.dense,
                            gqa_native=cost.gqa_native, **kwargs)


def _sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor,
            span: torch.Tensor, *, scale: float | None, q_offset: int | torch.Tensor,
            seq_lens: torch.Tensor | None, compensate: torch.Tensor | None) -> torch.Tensor:
    """The rules without SDPA: the block-sparse kernel on CUDA; elsewhere the windowed torch
    attention where it applies (no padding, no compensation token), else the kernel's torch
    version (the reference)."""
    if not use_triton("auto", q) and seq_lens is None and isinstance(q_offset, int) and (
            compensate is None or not torch.as_tensor(compensate).any()):
        return windowed_attention(q, k, v, sink, span, scale=scale, q_offset=q_offset)
    return sparse_attention(q, k, v, sink, span, scale=scale, q_offset=q_offset,
                            seq_lens=seq_lens, compensate=compensate)


def _split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: np.ndarray,
                     spans: np.ndarray, dense: Sequence[bool], *, scale: float | None,
                     gqa_native: bool, compensate: torch.Tensor | None = None,
                     **kwargs) -> torch.Tensor:
    """The split route: the kernel (or what stands in for it) skips the ``dense`` query heads
    (no sink, no window: no tiles, zero rows), SDPA computes them and its output is copied
    into the kernel's; ``sinks``/``spans`` per query head."""
    group = q.shape[1] // k.shape[1]
    skip = torch.tensor(dense)
    if compensate is not None:  # a KV head whose queries all go to SDPA drops nothing
        compensate = torch.as_tensor(compensate).cpu().bool() & ~skip.view(-1, group).all(1)
    out = _sparse(q, k, v, torch.from_numpy(sinks).masked_fill(skip, 0),
                 torch.from_numpy(spans).masked_fill(skip, 0), scale=scale,
                 compensate=compensate, **kwargs)
    runs = _runs(dense)
    if all(start % group == 0 and stop % group == 0 for start, stop in runs):
        # Whole GQA groups: their KV heads as they are (one run: views, no copy).
        kv_runs = [(start // group, stop // group) for start, stop in runs]
    else:  # a group split between the routes: each dense query head gets its KV head
        kv_runs = [(h // group, h // group + 1) for start, stop in runs
                   for h in range(start, stop)]
    dense_out = dense_attention(*(_heads(x, r) for x, r in ((q, runs), (k, kv_runs),
                                                               (v, kv_runs))),
                                scale=scale, gqa_native=gqa_native)
    at = 0
    for start, stop in runs:
        out[:, start:stop] = dense_out[:, at:at + stop - start]
        at += stop - start
    return out


def _heads(x: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The heads of ``x`` (``[B, H, N, D]``) in ``runs``, in order: a view for one run."""
    if len(runs) == 1:
        return x[:, runs[0][0]:runs[0][1]]
    return torch.cat([x[:, start:stop] for start, stop in runs], 1)


def _cache_file(device: torch.device) -> Path:
    # v6: masked tiles of 64 keys in the 128 x 128 programs, packed from a reach of 2048 keys
    # (the tile counts and both efficiencies moved), SDPA rated as the dense route calls it;
    # v5: groups sharing a rule pack 4 heads on 128 x 128 tiles from a reach of 3072 keys (the
    # short efficiency moved); v4: the split route hands SDPA its heads as views (its factor
    # moved); v3 files timed its copies, v2 files the unpacked kernel, v1 files Python calls.
    name = f"v6-{torch.cuda.get_device_name(device)}-torch{torch.__version__}-triton" \
           f"{_triton_version()}"
    root = Path(os.environ.get("MOAPLAN_CACHE_DIR", Path.home() / ".cache" / "moaplan"))
    return root / f"cost-{re.sub(r'[^A-Za-z0-9.]+', '_', name)}.json"


def _triton_version() -> str:
    import triton

    return triton.__version__


_COSTS: dict[int, CostModel] = {}  # by CUDA device index, once read or measured


def cost_model(device: torch.device) -> CostModel:
    """The cost model of ``device``'s GPU: read from disk, else measured now and kept
    (:func:`calibrate`); :data:`DEFAULT_COST` while a CUDA graph is being captured and the
    card has not been measured yet, or for this process if the measurement fails."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index in _COSTS:
        return _COSTS[index]
    if torch.cuda.is_current_stream_capturing():
        return DEFAULT_COST
    path = _cache_file(torch.device("cuda", index))
    try:
        cost = CostModel(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        try:
            cost = calibrate(torch.device("cuda", index))
        except Exception:  # out of memory beside a loaded model, say: route by the defaults
            log.warning("could not measure the prefill cost model; using the defaults",
                        exc_info=True)
            cost = DEFAULT_COST
        else:
            try:
                atomic_write_text(path, json.dumps(dataclasses.asdict(cost), indent=1))
            except OSError as err:
                log.warning("could not keep the prefill cost model in %s: %s", path, err)
    _COSTS[index] = cost
    return cost


def calibrate(device: torch.device, *, heads: tuple[int, int] = (32, 8),
              head_dim: int = 128, lengths: tuple[int, int] = CALIBRATION_LENGTHS,
              timer: Callable[[dict[str, Callable[[], object]]], dict[str, float]]
              = graph_medians) -> CostModel:
    """Measures a :class:`CostModel` on ``device`` in bf16 (a few seconds): SDPA and the
    kernel on all-full and half-window layers at a length where the kernel takes its short
    tiles and at one where it takes its long ones (``lengths``), SDPA with ``enable_gqa``
    against repeating the keys in the call, the split route, and a device copy.  ``timer``
    gives each function's milliseconds: by default the GPU's time of its CUDA-graph replay,
    all of them taking turns, since a prefill in a model runs with the host ahead.  Other
    ``lengths`` than :data:`CALIBRATION_LENGTHS` serve tests only: the split factors are read
    as measured there."""
    log.info("measuring the prefill cost model of %s", device)
    layers = [_CalibrationLayers(device, n, heads, head_dim) for n in lengths]
    fns = {f"{layer.n}/{name}": fn for layer in layers for name, fn in layer.fns().items()}
    src = layers[-1].q
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    times = timer(fns)
    short, long = (layer.rates({name.split("/")[1]: t for name, t in times.items()
                                if name.startswith(f"{layer.n}/")}) for layer in layers)
    cost = CostModel(sdpa_tflops=long["tflops"], efficiency_short=short["efficiency"],
                     efficiency_long=long["efficiency"],
                     copy_tbps=2 * src.numel() * src.element_size() / times["copy"] * 1e-9,
                     gqa_native=long["gqa_native"] and short["gqa_native"],
                     split_short=1.0, split_long=1.0)
    cost = dataclasses.replace(cost, **{
        f"split_{name}": times[f"{layer.n}/split"] * 1e-3 / layer.predicted_split(cost)
        for name, layer in zip(("short", "long"), layers)})
    log.info("prefill cost model: %s", cost)
    return cost


class _CalibrationLayers:
    """The layers :func:`calibrate` times at one length ``n``: dense SDPA (on keys repeated per
    query head beforehand, with ``enable_gqa``, and repeating them in the call), the kernel on
    an all-full and on a half-window layer, and the split route on a layer whose first half of
    KV heads is full and whose other half keeps 64 sinks and a window of N/4."""

    WINDOWED = {"full": (0, 1.0), "half": (64, 0.5)}  # name: (sink, span / n)

    def __init__(self, device: torch.device, n: int, heads: tuple[int, int], head_dim: int):
        self.n, self.heads, self.head_dim = n, heads, head_dim
        gen = torch.Generator(device=device).manual_seed(n)
        self.q, self.k, self.v = (
            torch.randn(1, h, n, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
            for h in (heads[0], heads[1], heads[1]))
        n_q, n_kv = heads
        self.full = np.arange(n_q) < n_q // 2 // (n_q // n_kv) * (n_q // n_kv)
        self.split_sinks = np.where(self.full, 0, 64)
        self.split_spans = np.where(self.full, n, n // 4)

    def fns(self) -> dict[str, Callable[[], object]]:
        q, k, v = self.q, self.k, self.v
        group = self.heads[0] // self.heads[1]
        kx, vx = (x.repeat_interleave(group, 1) for x in (k, v))
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, kx, vx, is_causal=True),
               "sdpa_gqa": lambda: dense_attention(q, k, v, scale=None, gqa_native=True),
               "sdpa_repeat": lambda: dense_attention(q, k, v, scale=None, gqa_native=False)}
        for name, (sink, share) in self.WINDOWED.items():
            rule = ([sink] * self.heads[1], [int(share * self.n)] * self.heads[1])
            fns[name] = lambda rule=rule: sparse_attention(q, k, v, *rule)
        # SDPA's own GQA in the split, as on every card measured; predicted_split predicts the
        # same, so the factor holds where a card lacks it and the route adds key copies.
        fns["split"] = lambda: _split_attention(q, k, v, self.split_sinks, self.split_spans,
                                                tuple(self.full), scale=None,
                                                gqa_native=True, q_offset=0, seq_lens=None)
        return fns

    def rates(self, ms: dict[str, float]) -> dict:
        """Whether SDPA's ``enable_gqa`` beats repeating the keys in the call, the rate of the
        SDPA call the dense route then makes (with ``enable_gqa``, or on repeated keys, whose
        copies the model adds), and the kernel's efficiency against that call (the lower of
        the all-full and the half-window layer) from the functions' times.  Both against one
        call: else a card where one SDPA call runs slower than the other would rate the
        kernel above the dense route on an all-full layer that it computes slower."""
        n, n_q = self.n, self.heads[0]
        gqa_native = ms["sdpa_gqa"] <= ms["sdpa_repeat"]
        sdpa = ms["sdpa_gqa"] if gqa_native else ms["sdpa"]
        ratios = []
        for name, (sink, share) in self.WINDOWED.items():
            # Every group's heads share the layer's one rule: the kernel packs them.
            tiles, _ = _kernel_tiles(np.full(n_q, sink), np.full(n_q, int(share * n)),
                                     np.ones(n_q, dtype=bool), n, self.head_dim,
                                     n_q // self.heads[1])
            ratios.append(float(tiles[0]) * sdpa / ms[name])
        return {"tflops": 4 * self.head_dim * n * (n + 1) / 2 * n_q / sdpa * 1e-9,
                "gqa_native": gqa_native, "efficiency": min(ratios)}

    def predicted_split(self, cost: CostModel) -> float:
        """The cost model's time of the split as :meth:`fns` times it (SDPA's own GQA)."""
        return choose_route(self.split_sinks, self.split_spans, self.n, self.head_dim,
                            dataclasses.replace(cost, gqa_native=True),
                            self.heads[0] // self.heads[1]).predicted_s["split"]
