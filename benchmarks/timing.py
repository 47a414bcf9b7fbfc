"""GPU timing shared by the benchmarks: do_bench medians and interleaved rounds (graph replays
come from ``moaplan.runtime.gpu_time.capture_graph``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import triton

from moaplan.runtime.gpu_time import interleaved_medians

# Rounds of interleaved timings per comparison: single do_bench medians of one kernel moved
# by up to 10% between runs minutes apart on the H100 (clocks), more than some margins.
ROUNDS = 3


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by triton.testing.do_bench (L2 flushed before each)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_together(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median over ``ROUNDS`` rounds of each function's do_bench median, the functions
    taking turns inside every round, so a drift of the card's speed hits all of them alike."""
    return interleaved_medians(fns, bench, ROUNDS)


def wall_seconds(fn: Callable[[], object]) -> float:
    """Host-clock seconds of ``fn`` with the GPU drained before and after: for work whose
    host cost is part of what is measured (a model step, a prefill)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start
