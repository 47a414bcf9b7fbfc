"""Decode benchmark: the split-KV kernel against SDPA, and a Llama-3-8B-shaped model end to end.

Kernel: bf16, 32 query / 8 KV heads, head_dim 128, a mixed plan (per-head spans N/32, N/16,
N/8, N/4, N/2 with 64 sinks, and three full heads: KV density ~0.5).  Useful bandwidth = bytes
of K and V the rule makes the query read / time.  SDPA runs on a dense cache [B, 8, N, 128]:
the padded cache holding the same tokens is that size (the full heads hold all N tokens), and
SDPA reads it whole.  Times are medians of ``triton.testing.do_bench``; the default launch and
SDPA are also timed as CUDA graph replays (the GPU's time alone), and per layer in a stack of
8 layers replayed from one graph, each layer with its own buffers (the time a model's decode
step spends on a layer).  The launch sweep:
the library's chunk for the batch (``auto``: at most 4096 slots, about two work items per SM) and
fixed chunks of 512/1024/2048 slots, each with a few tile configs; the default launch (auto chunk,
``DecodeConfig()``) is recorded beside the best one, against the issue's bandwidth target.
The compensation token's overhead: the default launch with tokens on the five windowed heads
(random evicted sums) against the same launch without, in the same process.

End to end: a random bf16 Llama-3-8B-shaped model, a plan of the same mixed heads (rotated per
layer), caches filled with random keys for 32K-token contexts (no prefill: it does not change
decode), then timed forward steps of one token: MoaplanCache + the plan's attention vs
transformers' DynamicCache + SDPA (with and without cuDNN, whose per-length plan building
costs a decode step; the faster is the baseline).  Cache memory is measured (allocator delta)
and compared with ``kv_bytes``; the largest batch is computed from the memory left after the
weights.

Two dense baselines stand beside the mixed plan (issue 15): moaplan's own runtime under an
all-full plan, replayed from the same CUDA graph (what the plan buys, the runtime being
equal), and transformers' fastest dense setup, a StaticCache + SDPA whose decode step is
replayed from a CUDA graph captured here.  Every run is set against its byte bound: the bytes
a step must read (weights, and the K/V its attention needs) over the card's measured copy
bandwidth.  Time to first token is measured at 32K and 128K tokens.

    python benchmarks/bench_decode.py --out DIR [--layers 32]
    python benchmarks/bench_decode.py --e2e-only --out DIR    # decode_e2e.{json,md} only
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moaplan.io import atomic_write_text
from moaplan.kernels.decode import DecodeConfig, decode_attention
from moaplan.kernels.layout import decode_layout
from moaplan.plan import ModelShape, Plan
from moaplan.rules import Rule, rule_sinks, rule_spans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_setups import GRAPH_RATES, best_rate, fastest_first_token  # noqa: E402
from e2e_setups import SETUPS as E2E_SETUPS  # noqa: E402
from provenance import provenance  # noqa: E402
from timing import ROUNDS, bench, bench_together, wall_seconds  # noqa: E402

from moaplan.runtime.cache import MoaplanCache, cache_keyword
from moaplan.runtime.compiled import compiled_layers
from moaplan.runtime.gpu_time import capture_graph
from moaplan.runtime.graphed import capture_decode_step

DEVICE = "cuda"
ALL_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
DENSE_BACKENDS = {
    "default": ALL_BACKENDS,
    "without cuDNN": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH],
}
HQ, HKV, DIM = 32, 8, 128
FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
# The default first; dict.fromkeys keeps one copy where a variant equals it.
CONFIGS = list(dict.fromkeys([DecodeConfig(), DecodeConfig(32, 4, 4), DecodeConfig(64, 4, 3),
                              DecodeConfig(64, 4, 4), DecodeConfig(128, 8, 3),
                              DecodeConfig(64, 4, 6), DecodeConfig(128, 4, 3)]))
CHUNKS = [None, 512, 1024, 2048]  # None: the library's chunk for the batch
# Useful TB/s the default launch should reach on the H200 (issue 15), per (batch, context).
TARGETS = {(8, 32768): 3.6, (1, 131072): 3.2}
# Layers of a stack: one CUDA graph runs the call once per layer, each over its own buffers,
# as a model's decode step does; the time per layer is the replay's over STACK.
STACK = 8
STEPS = 8  # decode steps per timed round, end to end
LONG = 131072  # the long prompt of the time-to-first-token measurement
# The end-to-end setups at the common batch (result key: label); the first three are the dense
# baselines the mixed plan is set against.
SETUPS = {key: labels[0] for key, labels in E2E_SETUPS.items()}
BASELINES = ("dense", "dense_static", "dense_flex", "moaplan_full")
_START = time.monotonic()


def mixed_rules(rotate: int = 0) -> list[Rule]:
    rules = [Rule(sink=64, beta=f, min_span=16) for f in FRACTIONS]
    rules += [Rule.full_attention()] * (HKV - len(rules))
    return rules[rotate % HKV:] + rules[:rotate % HKV]


def kernel_bench(batch: int, n: int) -> dict:
    rules = mixed_rules()
    sinks, spans = rule_sinks(rules, n).tolist(), rule_spans(rules, n).tolist()
    useful = batch * sum(min(n, s + w) for s, w in zip(sinks, spans)) * DIM * 2 * 2
    dense_bytes = batch * HKV * n * DIM * 2 * 2
    q = torch.randn(batch, HQ, DIM, device="cuda", dtype=torch.bfloat16)
    n_seen = torch.full((batch,), n, device="cuda")
    span = torch.tensor(spans, device="cuda").expand(batch, -1)
    cap = sum(sinks) + sum(spans)
    # One (keys, values) pair per layer of a stack; a single call reads the first.
    stack = [(torch.randn(batch, cap, DIM, device="cuda", dtype=torch.bfloat16),
              torch.randn(batch, cap, DIM, device="cuda", dtype=torch.bfloat16))
             for _ in range(STACK)]
    k_buf, v_buf = stack[0]

    def run(layout, cfg):
        return decode_attention(q, k_buf, v_buf, layout, n_seen, span, config=cfg)

    def per_layer_ms(layout, cfg) -> float:
        """The GPU's time per layer in a stack (one graph of STACK calls, one per layer)."""
        layers = lambda: [decode_attention(q, k, v, layout, n_seen, span, config=cfg)
                          for k, v in stack]
        return bench(capture_graph(layers)) / STACK

    # One discarded timing first: the first launch timed after the inputs were made ran 25%
    # slow on the H100 (clocks, caches), and it was always the default's.
    bench(lambda: run(decode_layout(sinks, spans, batch=batch, device="cuda"), None))
    rows = []
    for chunk in CHUNKS:
        layout = decode_layout(sinks, spans, batch=batch, device="cuda", chunk=chunk)
        for cfg in CONFIGS:
            call = lambda: run(layout, cfg)  # noqa: B023 (timed right here)
            ms = bench(call)
            graph_ms = bench(capture_graph(call))  # the GPU's time alone
            stack_ms = per_layer_ms(layout, cfg)
            rows.append(dict(chunk=layout.chunk, auto_chunk=chunk is None,
                             items=int(layout.items.shape[0]) * batch, block_n=cfg.block_n,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages, ms=ms,
                             useful_tb_s=useful / ms / 1e9, graph_ms=graph_ms,
                             graph_useful_tb_s=useful / graph_ms / 1e9, stack_ms=stack_ms,
                             stack_useful_tb_s=useful / stack_ms / 1e9,
                             default=chunk is None and cfg == DecodeConfig()))
    # Correctness of the default launch, against the torch path in float32.
    layout = decode_layout(sinks, spans, batch=batch, device="cuda")
    # The GPU's time alone (two launches, replayed from a CUDA graph), for ours and SDPA.
    graph_ms = bench(capture_graph(lambda: run(layout, None)))
    ref = decode_attention(q.float(), k_buf.float(), v_buf.float(), layout, n_seen, span,
                           backend="torch")
    check = float((run(layout, None).float() - ref).norm() / ref.norm())
    sdpa_ms, sdpa_graph_ms, sdpa_stack_ms = sdpa_bench(q, batch, n)
    best = min(rows, key=lambda r: r["ms"])
    default = next(r for r in rows if r["default"])
    stack_best = min(rows, key=lambda r: r["stack_ms"])
    target = TARGETS.get((batch, n))
    return dict(batch=batch, n=n, kv_density=useful / dense_bytes, useful_bytes=useful,
                rel_err_vs_fp32=check, sweep=rows, best=best, default=default,
                target_tb_s=target,
                default_meets_target=None if target is None else default["useful_tb_s"] >= target,
                sdpa_ms=sdpa_ms,
                sdpa_tb_s=dense_bytes / sdpa_ms / 1e9, speedup_vs_sdpa=sdpa_ms / best["ms"],
                graph=dict(ms=graph_ms, useful_tb_s=useful / graph_ms / 1e9,
                           sdpa_ms=sdpa_graph_ms, speedup_vs_sdpa=sdpa_graph_ms / graph_ms),
                stack=dict(layers=STACK, ms=default["stack_ms"],
                           useful_tb_s=default["stack_useful_tb_s"], best=stack_best,
                           sdpa_ms=sdpa_stack_ms, sdpa_tb_s=dense_bytes / sdpa_stack_ms / 1e9,
                           speedup_vs_sdpa=sdpa_stack_ms / default["stack_ms"]),
                compensation=compensation_overhead(rules, n, q, k_buf, v_buf, n_seen, span))


def compensation_overhead(rules: list[Rule], n: int, q, k_buf, v_buf, n_seen, span) -> dict:
    """The default launch with compensation tokens on the windowed heads vs without."""
    sinks, spans = rule_sinks(rules, n).tolist(), rule_spans(rules, n).tolist()
    compensate = [not r.full for r in rules]
    batch = q.shape[0]
    plain = decode_layout(sinks, spans, batch=batch, device="cuda")
    comp = decode_layout(sinks, spans, batch=batch, device="cuda", compensate=compensate)
    evicted = tuple(torch.randn(batch, HKV, DIM, device="cuda") for _ in range(2))
    off = lambda: decode_attention(q, k_buf, v_buf, plain, n_seen, span)
    on = lambda: decode_attention(q, k_buf, v_buf, comp, n_seen, span, evicted=evicted)
    times = bench_together({"off": off, "on": on, "graph_off": capture_graph(off),
                            "graph_on": capture_graph(on)})
    ref = decode_attention(q.float(), k_buf.float(), v_buf.float(), comp, n_seen, span,
                           evicted=evicted, backend="torch")
    return dict(compensating_heads=sum(compensate), ms_off=times["off"], ms_on=times["on"],
                overhead=times["on"] / times["off"] - 1,
                graph_overhead=times["graph_on"] / times["graph_off"] - 1,
                rel_err_vs_fp32=float((on().float() - ref).norm() / ref.norm()))


def sdpa_bench(q: torch.Tensor, batch: int, n: int) -> tuple[float, float, float]:
    """SDPA over the dense cache: ms from Python calls, from CUDA graph replays, and per layer
    in a stack of ``STACK`` layers (one graph, each layer its own dense cache)."""
    stack = [(torch.randn(batch, HKV, n, DIM, device="cuda", dtype=torch.bfloat16),
              torch.randn(batch, HKV, n, DIM, device="cuda", dtype=torch.bfloat16))
             for _ in range(STACK)]
    q4 = q[:, :, None]
    sdpa = lambda k, v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    one = functools.partial(sdpa, *stack[0])
    layers = lambda: [sdpa(k, v) for k, v in stack]
    return bench(one), bench(capture_graph(one)), bench(capture_graph(layers)) / STACK


def log(message: str) -> None:
    """A progress line with the time of day and the seconds since the start, flushed: a run
    cut off by its time limit still shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _START:4.0f} s] {message}",
          flush=True)


def random_llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=HQ, num_key_value_heads=HKV, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def copy_bandwidth(nbytes: int = 2 * 2**30) -> dict:
    """The card's copy bandwidth: a device-to-device ``copy_`` of ``nbytes`` (do_bench median,
    CUDA events).  A copy reads and writes every byte, and the rate counts both (bytes read +
    written per second): the convention under which the H200 gave ~4.25 TB/s.  It is the
    denominator of the byte bounds, whose steps mostly read."""
    src, dst = (torch.empty(nbytes, dtype=torch.uint8, device=DEVICE) for _ in range(2))
    ms = bench(functools.partial(dst.copy_, src))
    src = dst = None
    torch.cuda.empty_cache()
    return dict(bytes=nbytes, ms=ms, read_write_bytes_per_s=2 * nbytes / (ms * 1e-3),
                convention="bytes read + bytes written, per second, of one copy_")


def weight_bytes_read(model) -> int:
    """Bytes of weights a decode step reads: every parameter but the input embedding table, of
    which a step reads only its tokens' rows (the 8B shape does not tie it to the output head,
    which ``logits_to_keep=1`` still reads whole)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight is embed:
        return params
    return params - embed.numel() * embed.element_size()


def add_bound(row: dict, weight_bytes: int, kv_read: int, bandwidth: float) -> None:
    """Set ``row``'s step against its byte bound: (weights + the K/V bytes its attention must
    read) / copy bandwidth.  The measured step is the graph replay's where there is one, else
    the host clock's."""
    timed_by = "graph_tokens_per_s" if "graph_tokens_per_s" in row else "tokens_per_s"
    ms = 1e3 * row["batch"] / best_rate(row)
    bound_ms = 1e3 * (weight_bytes + kv_read) / bandwidth
    row["bound"] = dict(weight_bytes=weight_bytes, kv_bytes_read=kv_read, bound_ms=bound_ms,
                        ms_per_step=ms, timed_by=timed_by, fraction_of_bound=bound_ms / ms)


def versus(row: dict, base: dict) -> dict:
    """``row``'s tokens/s over ``base``'s (:func:`best_rate`), beside the ratio their byte
    bounds allow (tokens/s at the bound = batch / bound, so batches may differ)."""
    allow = (row["batch"] / row["bound"]["bound_ms"]) / (base["batch"] / base["bound"]["bound_ms"])
    return dict(measured=best_rate(row) / best_rate(base), bytes_allow=allow)


def fill(cache, layers: int, batch: int, n: int) -> None:
    """Random post-RoPE keys for ``n`` tokens in every layer (one tensor, expanded).  The
    ``cache_position`` is for transformers releases whose StaticCache still takes the slots
    to write from its caller; later ones count them on the device and ignore it."""
    k = torch.randn(1, HKV, n, DIM, device=DEVICE, dtype=torch.bfloat16).expand(batch, -1, -1, -1)
    slots = {"cache_position": torch.arange(n, device=DEVICE)}
    for layer in range(layers):
        if isinstance(cache, MoaplanCache):
            cache.layers[layer].append(k, k)
        else:
            cache.update(k.contiguous(), k.contiguous(), layer, slots)


def decode_tokens(steps: int, graphed: bool, compiled: bool = False) -> int:
    """Tokens :func:`decode_speed` appends to each sequence: two warm-up steps, ``ROUNDS``
    timed rounds and one profiled round of ``steps``; with a graph, one step on the side
    stream before the capture and ``ROUNDS`` replayed rounds (the captured step runs none);
    with ``compiled`` as many again for the compiled graph."""
    graphs = (1 + int(compiled)) if graphed else 0
    return 2 + (ROUNDS + 1) * steps + graphs * (1 + ROUNDS * steps)


def decode_speed(model, cache, batch: int, n: int, steps: int = STEPS,
                 graphed: bool = False, compiled: bool = False) -> dict:
    """Decode tokens/s from the host clock (median of ``ROUNDS`` rounds of ``steps`` steps,
    after two warm-up steps), and from the GPU's busy time alone (the kernels of ``steps`` more
    steps, from the profiler): eager decoding of a 32-layer model is partly bound by the host's
    launch cost, which differs between machines; the second is not.  With ``graphed``, also
    the tokens/s of steps replayed from a CUDA graph (a MoaplanCache, as
    ``moaplan.greedy_generate`` decodes, or a StaticCache, whose write position lives on the
    device).  With ``compiled`` too, also those of a graph captured with the model's decoder
    layers compiled (:func:`moaplan.runtime.compiled.compiled_layers`; a failure to compile
    or capture is recorded as ``compiled_error``)."""
    ids = torch.randint(0, 1000, (batch, 1), device=DEVICE)
    position = iter(range(n, n + 3 + (ROUNDS + 1) * steps))
    with_cache = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    # Older transformers releases take the slots a StaticCache writes from the caller, as a
    # view of the positions (so a replay's in-place position update moves it too).
    takes_slots = "cache_position" in inspect.signature(model.forward).parameters

    def forward(pos: torch.Tensor) -> None:
        slots = {"cache_position": pos[0]} if takes_slots else {}
        model(ids, position_ids=pos, **with_cache, **slots)

    def step() -> None:
        forward(torch.full((batch, 1), next(position), device=DEVICE))

    def run_steps(run) -> None:
        for _ in range(steps):
            run()

    def timed_rounds(run) -> float:
        rates = [batch * steps / wall_seconds(lambda: run_steps(run)) for _ in range(ROUNDS)]
        return statistics.median(rates)

    with torch.inference_mode():
        step(), step()
        speed = dict(tokens_per_s=timed_rounds(step))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_steps(step)
            torch.cuda.synchronize()
        if graphed:
            pos = torch.full((batch, 1), next(position), device=DEVICE)

            def step_in_place() -> None:
                forward(pos)
                pos.add_(1)

            def graph_rate() -> float:
                # A MoaplanCache keeps host counters that replays must be counted into; all of
                # a StaticCache's state (keys, values, its length) is on the device.
                moaplan = isinstance(cache, MoaplanCache)
                replay = (capture_decode_step(cache, step_in_place) if moaplan
                          else capture_graph(step_in_place))
                rate = timed_rounds(replay)
                if moaplan:
                    cache.count_replayed(ROUNDS * steps)
                return rate

            speed["graph_tokens_per_s"] = graph_rate()
            if compiled:
                try:
                    with compiled_layers(model):
                        speed["compiled_graph_tokens_per_s"] = graph_rate()
                except RuntimeError as err:  # compiling (dynamo, inductor) or capturing
                    speed["compiled_error"] = first_line(err)
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA)
    speed["gpu_tokens_per_s"] = batch * steps / (busy_us * 1e-6)
    return speed


def measure(model, make_cache, layers: int, batch: int, n: int, graphed: bool,
            compiled: bool = False) -> dict:
    """A new cache of ``batch`` sequences filled with ``n`` random tokens, its bytes
    (allocator delta) and its decode speed (:func:`decode_speed`); the cache is freed after."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cache = make_cache(batch, n)
    fill(cache, layers, batch, n)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    speed = decode_speed(model, cache, batch, n, graphed=graphed, compiled=compiled)
    del cache
    torch.cuda.empty_cache()
    return dict(batch=batch, held_bytes=held, **speed)


def first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def by_backend(run) -> dict:
    """``run()`` under each SDPA backend set of ``DENSE_BACKENDS``: the fastest row by
    :func:`best_rate` (a graph setup's faster of plain and compiled replays), with every set's
    rate (or its error: a set that fails to run or to be captured is recorded, not fatal).
    SDPA's default backend (cuDNN on the H100/H200) builds a new plan for every new key
    length, i.e. at every step of a growing cache."""
    rows = {}
    for name, backends in DENSE_BACKENDS.items():
        try:
            with sdpa_kernel(backends):
                rows[name] = run()
        except RuntimeError as err:  # out of memory, or a kernel the graph cannot hold
            rows[name] = dict(error=first_line(err))
        torch.cuda.empty_cache()  # after the except block, which kept the failed run's frames
    ran = [name for name in rows if "error" not in rows[name]]
    if not ran:
        return dict(error="; ".join(f"{k}: {v['error']}" for k, v in rows.items()))
    best = max(ran, key=lambda name: best_rate(rows[name]))
    return dict(rows[best], sdpa_backend=best, rate_by_backend={
        k: v["error"] if "error" in v else best_rate(v) for k, v in rows.items()})


def prefill_prompts(n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Token ids and attention masks: one ``n``-token prompt, and a left-padded batch of an
    ``n``-token prompt and a ``3n/4``-token one."""
    ids = torch.randint(0, 1000, (2, n), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :n // 4] = 0
    return {"batch 1": (ids[:1], mask[:1]), "batch 2, left padding": (ids, mask)}


def prefill_once(model, make_cache, ids: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Seconds of one prefill of ``ids`` into a fresh cache (time to first token); the cache
    is made before the clock starts and freed after."""
    with torch.inference_mode():
        cache = make_cache(*ids.shape)
        seconds = wall_seconds(functools.partial(
            model, ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
            **{cache_keyword(model): cache}))
        del cache
        torch.cuda.empty_cache()
    return seconds


def prefill_runs(model, make_cache, ids: torch.Tensor, mask: torch.Tensor,
                 rounds: int = ROUNDS) -> list[float]:
    """Seconds of each of ``rounds`` prefills of ``ids`` into a fresh cache (time to first
    token), after one warm-up."""
    return [prefill_once(model, make_cache, ids, mask) for _ in range(rounds + 1)][1:]


def prefill_seconds(model, make_cache, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """The median of :func:`prefill_runs`."""
    return statistics.median(prefill_runs(model, make_cache, ids, mask))


def long_prompt_runs(model, make_cache, rounds: int = 1) -> list[float] | dict:
    """Times to first token of ``rounds`` prefills of one ``LONG``-token prompt after a
    warm-up (~10 s each for the dense 8B shape), or the out-of-memory error."""
    ids = torch.randint(0, 1000, (1, LONG), device=DEVICE)
    try:
        return prefill_runs(model, make_cache, ids, torch.ones_like(ids), rounds=rounds)
    except torch.cuda.OutOfMemoryError as err:
        return dict(error=first_line(err))
    finally:
        torch.cuda.empty_cache()


def first_token_times(model, make_cache, n: int, eager_n: float | None = None,
                      long_rounds: int = 1) -> tuple[dict, dict, dict]:
    """Time to first token (batch 1) at ``n`` and at ``LONG`` tokens (the median of
    ``long_rounds`` timed runs there), as the model runs (``eager_n``: the time at ``n``
    where already measured) and with its decoder layers compiled (:func:`compiled_layers`,
    compiled in the warm-up runs), or the error of compiling; and the timed runs behind both
    (``eager``, ``compiled``: seconds by length, or an error)."""
    def median(times: list[float] | dict) -> float | dict:
        return times if isinstance(times, dict) else statistics.median(times)

    prompt = prefill_prompts(n)["batch 1"]
    runs = {"eager": {} if eager_n is not None
            else {str(n): prefill_runs(model, make_cache, *prompt)}}
    runs["eager"][str(LONG)] = long_prompt_runs(model, make_cache, long_rounds)
    ttft = {length: median(t) for length, t in runs["eager"].items()}
    if eager_n is not None:
        ttft = {str(n): eager_n, **ttft}
    try:
        with compiled_layers(model):
            runs["compiled"] = {str(n): prefill_runs(model, make_cache, *prompt),
                                str(LONG): long_prompt_runs(model, make_cache, long_rounds)}
        compiled = {length: median(t) for length, t in runs["compiled"].items()}
    except RuntimeError as err:  # compiling (dynamo, inductor)
        compiled = runs["compiled"] = dict(error=first_line(err))
    return ttft, compiled, runs


def prefill_times(model, make_cache, n: int) -> tuple[dict, dict, dict]:
    """Prefill seconds of :func:`prefill_prompts`, and :func:`first_token_times` (the batch-1
    prompt's time serving as the one at ``n``)."""
    prompts = {name: prefill_seconds(model, make_cache, *p)
               for name, p in prefill_prompts(n).items()}
    ttft, compiled, _ = first_token_times(model, make_cache, n, prompts["batch 1"])
    return prompts, ttft, compiled


def at_largest_batch(model, make_cache, layers: int, batch: int, n: int, graphed: bool,
                     backends: list[SDPBackend]) -> dict:
    """:func:`measure` at ``batch``, or its out-of-memory error (the batch is computed from
    the memory left, which the allocator's rounding can undercut)."""
    try:
        with sdpa_kernel(backends):
            return measure(model, make_cache, layers, batch, n, graphed, compiled=graphed)
    except torch.cuda.OutOfMemoryError as err:
        error = first_line(err)
    torch.cuda.empty_cache()
    return dict(batch=batch, error=error)


def flex_static(model, make_static, layers: int, batch: int, n: int) -> dict:
    """StaticCache + transformers' flex_attention, CUDA graph replays: flex decodes a one-token
    query with its keys split across thread blocks and skips the blocks its block mask
    leaves empty (the static cache's free tail), which SDPA under a mask does not.
    transformers compiles flex_attention (and the block mask) on the first call, in the
    eager warm-up steps; an error (compiling, capturing: RuntimeErrors both) is recorded."""
    model.set_attn_implementation("flex_attention")
    try:
        row = measure(model, make_static, layers, batch, n, True, compiled=True)
    except RuntimeError as err:
        row = dict(batch=batch, error=first_line(err))
    model.set_attn_implementation("sdpa")
    torch.cuda.empty_cache()  # after the except block, which kept the failed run's frames
    return row


def e2e(layers: int, n: int, batch: int, new: int = 96, out: dict | None = None,
        save=lambda: None) -> dict:
    """The end-to-end runs, filling ``out`` (returned) and calling ``save`` after each."""
    from transformers import DynamicCache, StaticCache

    from moaplan.runtime import apply, remove
    from moaplan.runtime.memory import kv_bytes

    appended = decode_tokens(STEPS, graphed=True, compiled=True)
    if appended > new:  # a StaticCache has no room past n + new
        raise ValueError(f"decode_speed appends {appended} tokens; new={new}")
    out = {} if out is None else out
    model = random_llama(layers)
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    shape = ModelShape.from_config(model.config)
    plan = Plan(shape, [mixed_rules(i) for i in range(layers)])
    full = Plan(shape, [[Rule.full_attention()] * HKV for _ in range(layers)])
    out.update(layers=layers, n=n, max_length=n + new, weights_gib=weights / 2**30,
               plan_kv_density=float(plan.densities([n])["kv"].mean()),
               copy_bandwidth=copy_bandwidth(), weight_bytes_read=weight_bytes_read(model))
    bandwidth = out["copy_bandwidth"]["read_write_bytes_per_s"]
    log(f"model ready ({weights / 2**30:.1f} GiB); copy bandwidth {bandwidth / 1e12:.2f} TB/s "
        "(read + write)")
    save()

    def kv_read(which: Plan, b: int, dense: bool = False) -> int:
        """K/V bytes a step at context n reads: the plan's slots (sinks + span(n)), or with
        ``dense`` all n tokens (2 x layers x KV heads x n x head_dim x 2 bytes x batch)."""
        return kv_bytes(which, model.config, n, b, torch.bfloat16, dense=dense)

    def record(row: dict, kv: int, what: str) -> dict:
        if "error" not in row:
            add_bound(row, out["weight_bytes_read"], kv, bandwidth)
            b = row["bound"]
            graph = (f"{row['graph_tokens_per_s']:.1f} graph, "
                     if "graph_tokens_per_s" in row else "")
            log(f"{what}, batch {row['batch']}: {row['tokens_per_s']:.1f} tok/s host clock, "
                f"{graph}{row['gpu_tokens_per_s']:.1f} GPU-only; {b['ms_per_step']:.2f} ms/step vs "
                f"bound {b['bound_ms']:.2f} ms ({100 * b['fraction_of_bound']:.0f}%)")
        else:
            log(f"{what}, batch {row.get('batch', batch)}: {row['error']}")
        save()
        return row

    # Makers of a fresh cache for (batch, context): room for `new` tokens past the context.
    make_dense = lambda b, context: DynamicCache()
    make_static = lambda b, context: StaticCache(config=model.config,
                                                 max_cache_len=context + new)

    def make_moaplan(which: Plan):
        return lambda b, context: MoaplanCache(which, b, context + new, torch.bfloat16, DEVICE)

    def run_prefill(name: str, make) -> None:
        prompts, ttft, compiled = prefill_times(model, make, n)
        out.setdefault("prefill_s", {})[name] = prompts
        out.setdefault("ttft_s", {})[name] = ttft
        out.setdefault("ttft_compiled_s", {})[name] = compiled
        log(f"prefill ({name}): " + ", ".join(f"{k} {v:.3f} s" for k, v in prompts.items())
            + f"; time to first token at {LONG}: {ttft[str(LONG)]}; compiled: {compiled}")
        save()

    # Dense, transformers' own attention (no plan applied yet).
    run_prefill("dense", make_dense)
    dense = by_backend(lambda: measure(model, make_dense, layers, batch, n, False))
    if "error" in dense:  # the reference every other row is compared with
        raise RuntimeError(f"DynamicCache + SDPA failed: {dense['error']}")
    dense["predicted_bytes"] = kv_read(plan, batch, dense=True)
    out["dense"] = record(dense, kv_read(plan, batch, dense=True), "DynamicCache + SDPA")
    # transformers' fastest dense decode: a StaticCache step replayed from a CUDA graph.  SDPA
    # then attends, with a mask, over all n + new slots (how transformers runs it); the bound
    # counts the n tokens the step needs, 0.2% fewer.
    out["dense_static"] = record(
        by_backend(lambda: measure(model, make_static, layers, batch, n, True, compiled=True)),
        kv_read(plan, batch, dense=True), "StaticCache + SDPA, CUDA graph")

    reserve = 4 * 2**30  # decode activations, logits
    free = total - weights - reserve
    # moaplan's runtime with every head full: the same kernels and graph as the plan below,
    # also at the largest batch its (dense-sized) cache fits: the fairest dense side of the
    # "more sequences in the same memory" comparison.
    apply(model, full, strict=False)
    full_row = measure(model, make_moaplan(full), layers, batch, n, True, compiled=True)
    out["moaplan_full"] = record(full_row, kv_read(full, batch), "MoaplanCache + all-full plan")
    b = int(free // (full_row["held_bytes"] / batch))
    full_row["at_largest_batch"] = record(
        at_largest_batch(model, make_moaplan(full), layers, b, n, True, ALL_BACKENDS),
        kv_read(full, b), "MoaplanCache + all-full plan")

    make_moa = make_moaplan(plan)
    apply(model, plan, strict=False)
    run_prefill("moaplan", make_moa)
    moa = measure(model, make_moa, layers, batch, n, True, compiled=True)
    predicted = kv_bytes(plan, model.config, n + new, batch, torch.bfloat16)
    moa.update(predicted_bytes=predicted, prediction_error=moa["held_bytes"] / predicted - 1,
               memory_vs_dense=moa["held_bytes"] / dense["held_bytes"])
    out["moaplan"] = record(moa, kv_read(plan, batch), "MoaplanCache + mixed plan")
    out["moaplan_vs"] = {key: versus(moa, out[key]) for key in BASELINES
                         if "bound" in out.get(key, {})}

    # A DynamicCache step also holds, while torch.cat grows it, a new copy of one layer's keys
    # (then values): 1/(2 x layers) more than the cache (1.9 GiB at batch 30 on the H200,
    # which a fixed reserve missed).
    per_seq = {"dense": dense["held_bytes"] / batch * (1 + 1 / (2 * layers)),
               "moaplan": moa["held_bytes"] / batch}
    out["largest_batch"] = {k: int(free // v) for k, v in per_seq.items()}
    out["largest_batch_ratio"] = out["largest_batch"]["moaplan"] / out["largest_batch"]["dense"]
    b = out["largest_batch"]["moaplan"]
    moa["at_largest_batch"] = record(
        at_largest_batch(model, make_moa, layers, b, n, True, ALL_BACKENDS),
        kv_read(plan, b), "MoaplanCache + mixed plan")
    remove(model)
    b = out["largest_batch"]["dense"]
    dense["at_largest_batch"] = record(
        at_largest_batch(model, make_dense, layers, b, n, False,
                         DENSE_BACKENDS[dense["sdpa_backend"]]),
        kv_read(plan, b, dense=True), "DynamicCache + SDPA")
    # Last, so that a failure (compiling, capturing) costs no other row.
    out["dense_flex"] = record(flex_static(model, make_static, layers, batch, n),
                               kv_read(plan, batch, dense=True),
                               "StaticCache + flex_attention, CUDA graph")
    out["moaplan_vs"] = {key: versus(moa, out[key]) for key in BASELINES
                         if "bound" in out.get(key, {})}
    largest = moa["at_largest_batch"], full_row["at_largest_batch"]
    if all("bound" in row for row in largest):
        out["largest_batch_vs_full"] = versus(*largest)
    return out


def _chunk(row: dict) -> str:
    return f"auto={row['chunk']}" if row["auto_chunk"] else str(row["chunk"])


def _config(row: dict) -> str:
    return f"{row['block_n']}, {row['num_warps']}, {row['num_stages']}"


def _launch(row: dict) -> str:
    return f"{_chunk(row)}, {_config(row)}"


def markdown(result: dict) -> str:
    """The report: the kernel part and the end-to-end part, whichever the result has."""
    title = "Decode benchmark" if result.get("kernel") else "Decode end to end"
    lines = [f"# {title} ({result['card']}, {result['date']}, commit {result['commit']})"]
    if result.get("kernel"):
        lines += kernel_markdown(result["kernel"])
    if result.get("e2e"):
        lines += e2e_markdown(result["e2e"])
    return "\n".join(lines) + "\n"


def kernel_markdown(kernel: list[dict]) -> list[str]:
    lines = ["", "Kernel: bf16, 32 query / 8 KV heads, head_dim 128, mixed plan (spans N/32..N/2 "
             "with 64 sinks, 3 full heads). Useful bandwidth = K/V bytes the rule reads / time.",
             "", "Launch: (chunk, block_n, warps, stages); the default is the auto chunk for the "
             "batch and `DecodeConfig()`.", "",
             "| batch | context | KV density | default launch | ms | useful TB/s | target "
             "| best launch | ms | useful TB/s | SDPA dense ms | SDPA TB/s | speedup (best) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in kernel:
        d, b = k["default"], k["best"]
        lines.append(f"| {k['batch']} | {k['n']} | {k['kv_density']:.3f} | {_launch(d)} | "
                     f"{d['ms']:.3f} | {d['useful_tb_s']:.2f} | "
                     f"{_verdict(k, d['useful_tb_s'])} | {_launch(b)} | "
                     f"{b['ms']:.3f} | {b['useful_tb_s']:.2f} | {k['sdpa_ms']:.3f} | "
                     f"{k['sdpa_tb_s']:.2f} | {k['speedup_vs_sdpa']:.2f}x |")
    graphs = [k for k in kernel if "graph" in k]  # older results lack it
    if graphs:
        lines += ["", "The GPU's time alone: the default launch (split + merge) and SDPA replayed "
                  "from CUDA graphs.  The table above times Python calls, whose host cost can "
                  "show in a 0.1 ms kernel.", "",
                  "| batch | context | ours ms | useful TB/s | target | SDPA ms | speedup |",
                  "|---|---|---|---|---|---|---|"]
    for k in graphs:
        g = k["graph"]
        lines.append(f"| {k['batch']} | {k['n']} | {g['ms']:.3f} | {g['useful_tb_s']:.2f} | "
                     f"{_verdict(k, g['useful_tb_s'])} | {g['sdpa_ms']:.3f} | "
                     f"{g['speedup_vs_sdpa']:.2f}x |")
    stacks = [k for k in kernel if "stack" in k]  # older results lack it
    if stacks:
        lines += ["", f"Per layer in a stack of {stacks[0]['stack']['layers']} layers: one CUDA "
                  "graph runs the call once per layer, each over its own buffers, as a model's "
                  "decode step does (the GPU's time a step spends on it).  A graph of one call "
                  "also pays, once per replay, the graph's launch and the write-back of the "
                  "dirty L2 lines that `do_bench` leaves when it clears the cache by zeroing "
                  "256 MB; a stack pays them once for all its layers.", "",
                  "| batch | context | ours ms | useful TB/s | target | best launch | ms "
                  "| useful TB/s | SDPA ms | SDPA TB/s | speedup (default) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in stacks:
        st, b = k["stack"], k["stack"]["best"]
        lines.append(f"| {k['batch']} | {k['n']} | {st['ms']:.3f} | {st['useful_tb_s']:.2f} | "
                     f"{_verdict(k, st['useful_tb_s'])} | {_launch(b)} | {b['stack_ms']:.3f} | "
                     f"{b['stack_useful_tb_s']:.2f} | {st['sdpa_ms']:.3f} | "
                     f"{st['sdpa_tb_s']:.2f} | {st['speedup_vs_sdpa']:.2f}x |")
    for k in kernel:
        configs = list(dict.fromkeys(_config(r) for r in k["sweep"]))
        timings = [(key, how) for key, how in (
            ("useful_tb_s", "Python calls"),
            ("graph_useful_tb_s", "CUDA graph replays, the GPU's time alone"),
            ("stack_useful_tb_s", "per layer in a stack of layers, one CUDA graph"))
            if key in k["sweep"][0]]  # older results lack the later ones
        for key, how in timings:
            lines += ["", f"Sweep at batch {k['batch']} / {k['n']} ({how}): useful TB/s per "
                      "chunk (rows) and (block_n, warps, stages) (columns).", "",
                      "| chunk (items) | " + " | ".join(configs) + " |",
                      "|---" * (len(configs) + 1) + "|"]
            by_chunk: dict[str, dict[str, float]] = {}
            for r in k["sweep"]:
                label = f"{_chunk(r)} ({r['items']})"
                by_chunk.setdefault(label, {})[_config(r)] = r[key]
            for label, cells in by_chunk.items():
                lines.append(f"| {label} | " + " | ".join(f"{cells[c]:.2f}" for c in configs)
                             + " |")
    measured = [k for k in kernel if "compensation" in k]  # older results lack it
    if measured:
        lines += ["", "Compensation tokens on the 5 windowed heads (default launch):", "",
                  "| batch | context | off ms | on ms | overhead | GPU-only overhead (graph) "
                  "| rel. err vs fp32 |", "|---|---|---|---|---|---|---|"]
    for k in measured:
        c = k["compensation"]
        graph = f"{100 * c['graph_overhead']:+.1f}%" if "graph_overhead" in c else "-"
        lines.append(f"| {k['batch']} | {k['n']} | {c['ms_off']:.3f} | {c['ms_on']:.3f} | "
                     f"{100 * c['overhead']:+.1f}% | {graph} | {c['rel_err_vs_fp32']:.1e} |")
    return lines


def _verdict(k: dict, tb_s: float) -> str:
    """The bandwidth target of ``k``'s shape, and whether ``tb_s`` meets it."""
    if k["target_tb_s"] is None:
        return "-"
    return f"{k['target_tb_s']:.2f} ({'met' if tb_s >= k['target_tb_s'] else 'missed'})"


def _num(value, fmt: str = ".1f") -> str:
    """A number, or the error recorded in its place."""
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return f"error: {value.get('error', value) if isinstance(value, dict) else value}"


def _rates(row: dict, keys=("tokens_per_s", "gpu_tokens_per_s", *GRAPH_RATES)) -> str:
    return " | ".join(f"{row[k]:.1f}" if k in row else "-" for k in keys)


def bound_markdown(e: dict) -> list[str]:
    """Each setup against its byte bound, and against each dense baseline."""
    rows = [(label, e[key]) for key, label in SETUPS.items() if key in e]
    rows += [(f"{SETUPS[key]}, largest batch", e[key]["at_largest_batch"])
             for key in ("moaplan", "moaplan_full", "dense")
             if "at_largest_batch" in e.get(key, {})]
    if not rows:
        return []
    bases = [key for key in BASELINES if "bound" in e.get(key, {})]
    bw = e["copy_bandwidth"]
    lines = ["", f"Decode against the byte bound ({e['n']}-token contexts, graph replays where "
             "there are some).", "",
             "| setup | batch | tokens/s (host clock) | GPU-only tokens/s | graph tokens/s "
             "| compiled graph tokens/s | ms/step | byte bound ms | % of bound | "
             + " | ".join(f"vs {SETUPS[key]}" for key in bases) + " |",
             "|---" * (9 + len(bases)) + "|"]
    for label, row in rows:
        if "sdpa_backend" in row:
            label += f" (SDPA {row['sdpa_backend']})"
        if "error" in row:
            lines.append(f"| {label} | {row.get('batch', '-')} | error: {row['error']} |"
                         + " - |" * (6 + len(bases)))
            continue
        b = row["bound"]
        ratios = [versus(row, e[key]) for key in bases]
        lines.append(f"| {label} | {row['batch']} | {_rates(row)} | {b['ms_per_step']:.2f} | "
                     f"{b['bound_ms']:.2f} | {100 * b['fraction_of_bound']:.0f}% | "
                     + " | ".join(f"{r['measured']:.2f}x ({r['bytes_allow']:.2f}x)"
                                  for r in ratios) + " |")
    dense_kv = next((r["bound"]["kv_bytes_read"] for _, r in rows[:1] if "bound" in r), None)
    failed = [f"{label}: {row['compiled_error']}" for label, row in rows
              if "compiled_error" in row]
    lines += ["", "- ms/step: from the faster graph replay where the setup has them, else from "
              "the host clock (DynamicCache: its tensors grow every step, so it cannot be "
              "replayed).",
              "- compiled graph: the same step captured with the model's decoder layers "
              "compiled by `torch.compile` (`moaplan.runtime.compiled.compiled_layers`, as "
              "`moaplan.greedy_generate(..., compile=True)` decodes; moaplan's attention and "
              "cache stay eager), which fuses the layers' small kernels (RMSNorm, rotary, "
              "SiLU, residual adds)."
              + (" It failed for " + "; ".join(failed) + "." if failed else ""),
              f"- Byte bound: (weights a step reads, {e['weight_bytes_read'] / 2**30:.2f} GiB: "
              "all but the input embedding table, of which a step reads its tokens' rows; + the "
              "K/V bytes its attention needs) / the copy bandwidth, "
              f"{bw['read_write_bytes_per_s'] / 1e12:.2f} TB/s counted as bytes read + "
              f"written per second of a {bw['bytes'] / 2**30:.0f} GiB device-to-device "
              "`copy_` (the bound takes a step's reads at that rate).  K/V bytes: the dense "
              "setups and the all-full plan read all n tokens of every head"
              + (f" ({dense_kv / 2**30:.2f} GiB at batch {rows[0][1]['batch']})"
                 if dense_kv else "")
              + "; the mixed plan its sinks + span(n) per head (`kv_bytes`).",
              "- StaticCache: transformers' setup for fixed-shape decoding; its decode step "
              "(one `model(...)` on static input ids and positions, updated in place; the "
              "cache keeps its write position on the device) is captured with "
              "`torch.cuda.graph` after a warm-up on a side stream and replayed.  With SDPA, "
              f"attention runs, with a mask, over all {e['max_length']} slots of the static "
              "cache, the free ones included, which is how transformers runs it; under a mask "
              "SDPA does not take its flash kernel, and the kernels it takes are slow for a "
              "one-token query over a long cache (see its % of bound).  With flex_attention "
              "(compiled by transformers on first use) the block mask lets the kernel skip the "
              "free slots.  The bound counts the n tokens the step needs.",
              "- DynamicCache + SDPA also copies its whole cache every step (`torch.cat`), "
              "which the bound does not count.",
              "- vs columns: this row's tokens/s over the baseline's (graph where measured, "
              "else host clock), and in parentheses the ratio their byte bounds allow (tokens/s "
              "at the bound = batch / bound ms)."]
    return lines


def ttft_markdown(e: dict) -> list[str]:
    ttft, compiled = e.get("ttft_s", {}), e.get("ttft_compiled_s", {})
    if "dense" not in ttft:
        return []
    lines = ["", "Time to first token, batch 1 (prefill with `logits_to_keep=1`; the shorter "
             f"context: median of {ROUNDS} runs after a warm-up, the longer: one run after a "
             "warm-up), as the model runs and with its decoder layers compiled "
             "(`compiled_layers`, compiled in the warm-up):", "",
             "| context | DynamicCache + SDPA s | compiled | MoaplanCache + mixed plan s | "
             "compiled | speedup | compiled vs compiled | each side's faster |",
             "|---|---|---|---|---|---|---|---|"]

    def ratio(dense_s, ours_s) -> str:
        both = isinstance(dense_s, float) and isinstance(ours_s, float)
        return f"{dense_s / ours_s:.2f}x" if both else "-"

    def seconds(times: dict, side: str, length: str) -> str:
        run = times.get(side, {})  # by length, or a compile error
        value = run if "error" in run else run.get(length)
        return "-" if value is None else _num(value, ".3f")

    for length in ttft["dense"]:
        row = [seconds(ttft, "dense", length), seconds(compiled, "dense", length),
               seconds(ttft, "moaplan", length), seconds(compiled, "moaplan", length),
               ratio(ttft["dense"][length], ttft.get("moaplan", {}).get(length)),
               ratio(compiled.get("dense", {}).get(length),
                     compiled.get("moaplan", {}).get(length)),
               ratio(fastest_first_token(e, "dense", length),
                     fastest_first_token(e, "moaplan", length))]
        lines.append(f"| {length} | " + " | ".join(row) + " |")
    return lines


def e2e_markdown(e: dict) -> list[str]:
    lines = ["", f"End to end: random bf16 Llama-3-8B shape with {e['layers']} layers, "
             f"{e['n']}-token contexts, plan KV density {e['plan_kv_density']:.3f}."]
    lines += bound_markdown(e) + ttft_markdown(e)
    if "moaplan" in e and "largest_batch" in e:
        d, m = e["dense"], e["moaplan"]
        lines += ["", "| cache | batch | KV bytes held | predicted | decode tok/s | CUDA graph "
                  "tok/s | GPU-only tok/s | largest batch | tok/s at largest | CUDA graph at "
                  "largest | GPU-only at largest |", "|---" * 11 + "|"]
        rates = functools.partial(_rates, keys=("tokens_per_s", "graph_tokens_per_s",
                                                "gpu_tokens_per_s"))
        for name, r in (("DynamicCache + SDPA", d), ("MoaplanCache + plan", m)):
            key = "dense" if r is d else "moaplan"
            lines.append(f"| {name} | {r['batch']} | {r['held_bytes'] / 2**30:.2f} GiB | "
                         f"{r['predicted_bytes'] / 2**30:.2f} GiB | {rates(r)} | "
                         f"{e['largest_batch'][key]} | {rates(r.get('at_largest_batch', {}))} |")
        lines += ["", f"decode tok/s: host clock, the median of {ROUNDS} rounds of {STEPS} steps "
                  "(eager PyTorch, so partly bound by the host's launch cost, which differs "
                  "between machines); CUDA graph: the same, each step replayed from one graph (as "
                  "`moaplan.greedy_generate` decodes; DynamicCache's growing tensors cannot be "
                  f"replayed); GPU-only: from the kernels' busy time over {STEPS} eager steps (the "
                  "profiler), what a launch-free decode loop would approach."]
        for row, what in ((d, "DynamicCache + SDPA decode tok/s"),
                          (e.get("dense_static", {}), "StaticCache + SDPA graph tok/s (the "
                           "faster of plain and compiled)")):
            if "rate_by_backend" in row:  # older results lack it
                lines += ["", f"{what} at batch {row['batch']} by SDPA backend: " + ", ".join(
                    f"{k} {_num(v)}" for k, v in row["rate_by_backend"].items())
                    + f"; the tables use the faster ({row['sdpa_backend']})."]
        lines += ["", f"Memory vs DynamicCache: {m['memory_vs_dense']:.3f}; prediction error "
                  f"{100 * m['prediction_error']:+.2f}%; largest batch ratio "
                  f"{e['largest_batch_ratio']:.2f}x (computed from the memory left after the "
                  "weights and a 4 GiB reserve; DynamicCache's also leaves room for the copy of "
                  "one layer's keys that torch.cat makes at each step)."]
    p = e.get("prefill_s", {})
    if "moaplan" in p:  # older results lack it
        lines += ["", f"Prefill of {e['n']}-token prompts (time to first token, median of "
                  f"{ROUNDS}), DynamicCache + SDPA (default backend) vs MoaplanCache + plan "
                  "(block-sparse kernel):", "", "| prompts | dense s | moaplan s | speedup |",
                  "|---|---|---|---|"]
        for name, dense_s in p["dense"].items():
            ours_s = p["moaplan"][name]
            lines.append(f"| {name} | {dense_s:.3f} | {ours_s:.3f} | {dense_s / ours_s:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/h100"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-only", action="store_true",
                        help="only the end-to-end part, into OUT/decode_e2e.{json,md} "
                             "(a few minutes on an H200)")
    args = parser.parse_args()
    if args.skip_e2e and args.e2e_only:
        parser.error("--skip-e2e and --e2e-only leave nothing to run")
    import transformers

    result = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                  commit=provenance()["commit"], torch=torch.__version__,
                  triton=triton.__version__, transformers=transformers.__version__)
    stem = "decode_e2e" if args.e2e_only else "decode"

    def save() -> None:
        atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1))
        atomic_write_text(args.out / f"{stem}.md", markdown(result))

    if not args.e2e_only:
        result["kernel"] = []
        for batch, n in ((8, 32768), (1, 131072)):
            result["kernel"].append(kernel_bench(batch, n))
            save()
            k = result["kernel"][-1]
            print(f"B={batch} N={n}: default {k['default']['ms']:.3f} ms "
                  f"{k['default']['useful_tb_s']:.2f} TB/s (target {k['target_tb_s']}), best "
                  f"{_launch(k['best'])} {k['best']['ms']:.3f} ms "
                  f"{k['best']['useful_tb_s']:.2f} TB/s, SDPA {k['sdpa_ms']:.3f} ms, err "
                  f"{k['rel_err_vs_fp32']:.1e}; graph {k['graph']['ms']:.3f} ms "
                  f"{k['graph']['useful_tb_s']:.2f} TB/s", flush=True)
            torch.cuda.empty_cache()
    if not args.skip_e2e:
        result["e2e"] = {}
        e2e(args.layers, 32768, 8, out=result["e2e"], save=save)
        save()
        log("done")
    print(markdown(result))
    if result.get("kernel"):
        assert math.isfinite(result["kernel"][0]["best"]["ms"])


if __name__ == "__main__":
    main()
