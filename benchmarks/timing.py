"""GPU timing shared by the benchmarks: do_bench medians, interleaved rounds (graph replays
come from ``moaplan.runtime.gpu_time.capture_graph``) and speedups with their intervals."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import triton
from scipy import stats

from moaplan.runtime.gpu_time import interleaved_times
from moaplan.validation import Interval

# Rounds of interleaved timings per comparison: single do_bench medians of one kernel moved
# by up to 10% between runs minutes apart on the H100 (clocks), more than some margins.
ROUNDS = 3


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by triton.testing.do_bench (L2 flushed before each)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_rounds(fns: dict[str, Callable[[], object]],
                 rounds: int = ROUNDS) -> dict[str, list[float]]:
    """Each function's do_bench median in each of ``rounds`` rounds, the functions taking
    turns inside every round, so a drift of the card's speed hits all of them alike."""
    return interleaved_times(fns, bench, rounds)


def bench_together(fns: dict[str, Callable[[], object]],
                   rounds: int = ROUNDS) -> dict[str, float]:
    """The median over rounds of :func:`bench_rounds`."""
    return {name: statistics.median(ts) for name, ts in bench_rounds(fns, rounds).items()}


@dataclass(frozen=True)
class Speedup:
    """Baseline time over ours: the geometric mean over runs, with its 95% t-interval."""

    mean: float
    low: float
    high: float
    runs: int

    @classmethod
    def paired(cls, baseline: Sequence[float], ours: Sequence[float]) -> Speedup:
        """From times taken in pairs (entry ``r`` of both in the same round): the interval of
        the mean log ratio, so the rounds' common drift cancels."""
        logs = np.log(np.asarray(baseline, dtype=float) / np.asarray(ours, dtype=float))
        if logs.size < 2:  # one round: no interval, rather than Interval's zero width
            return cls._of(logs.mean(), math.inf, logs.size)
        mean_log = Interval.of(logs)
        return cls(math.exp(mean_log.mean), math.exp(mean_log.low), math.exp(mean_log.high),
                   mean_log.count)

    @classmethod
    def unpaired(cls, baseline: Sequence[float], ours: Sequence[float]) -> Speedup:
        """From two independent samples of runs: Welch's interval on the log times."""
        a, b = (np.log(np.asarray(x, dtype=float)) for x in (baseline, ours))
        if min(a.size, b.size) < 2:
            return cls._of(a.mean() - b.mean(), math.inf, min(a.size, b.size))
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        se = math.sqrt(va + vb)
        dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1)) if se else 1
        return cls._of(a.mean() - b.mean(), stats.t.ppf(0.975, dof) * se,
                       min(a.size, b.size))

    @classmethod
    def _of(cls, log_mean: float, half: float, runs: int) -> Speedup:
        return cls(math.exp(log_mean), math.exp(log_mean - half), math.exp(log_mean + half),
                   int(runs))

    def against(self, target: float) -> str:
        """"above", "below" or "tie" (the interval holds ``target``)."""
        return "above" if self.low > target else "below" if self.high < target else "tie"

    def __str__(self) -> str:
        return f"{self.mean:.3f}x [{self.low:.3f}, {self.high:.3f}]"


def wall_seconds(fn: Callable[[], object]) -> float:
    """Host-clock seconds of ``fn`` with the GPU drained before and after: for work whose
    host cost is part of what is measured (a model step, a prefill)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start
