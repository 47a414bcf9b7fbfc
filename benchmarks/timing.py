"""GPU timing shared by the benchmarks: do_bench medians, interleaved rounds, graph replays."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
import triton

# Rounds of interleaved timings per comparison: single do_bench medians of one kernel moved
# by up to 10% between runs minutes apart on the H100 (clocks), more than some margins.
ROUNDS = 3


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by triton.testing.do_bench (L2 flushed before each)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_together(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median over ``ROUNDS`` rounds of each function's do_bench median, the functions
    taking turns inside every round, so a drift of the card's speed hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name].append(bench(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def captured(fn: Callable[[], object]) -> Callable[[], None]:
    """A CUDA graph of ``fn``'s launches, to replay: the GPU's time without the host's."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # a first run on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
