"""The GPU's time alone: CUDA-graph captures and interleaved median timings.

A prefill inside a model runs with the host ahead of the GPU, so what decides between two ways
of computing a layer is the GPU's time, not that of a Python call (whose host cost, tens of
microseconds a launch, dominates a short layer timed alone).  Replaying a CUDA graph removes the
host from the measurement.  Timings taken in turns, over a few rounds, let a drift of the card's
clocks hit every candidate alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def capture_graph(fn: Callable[[], object]) -> Callable[[], None]:
    """Runs ``fn`` once on a side stream (capture needs its kernels compiled and its
    workspaces allocated), then records the next call in a CUDA graph; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    recorded = torch.cuda.CUDAGraph()
    with torch.cuda.graph(recorded):
        fn()
    return recorded.replay


def interleaved_times(fns: dict[str, Callable[[], object]],
                      bench: Callable[[Callable[[], object]], float],
                      rounds: int) -> dict[str, list[float]]:
    """``bench(fn)`` of each function in each of ``rounds`` rounds, the functions taking turns
    inside every round: entry ``r`` of every list comes from the same round.  Every other round
    runs them in reverse order: a function's place in a round biases its time (what ran just
    before it, the card's clocks), and a pair of rounds cancels that bias where it is linear."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name in (fns if r % 2 == 0 else reversed(list(fns))):
            times[name].append(bench(fns[name]))
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]],
                        bench: Callable[[Callable[[], object]], float],
                        rounds: int) -> dict[str, float]:
    """Median over ``rounds`` rounds of ``bench(fn)`` for each function, the functions taking
    turns inside every round."""
    return {name: statistics.median(ts)
            for name, ts in interleaved_times(fns, bench, rounds).items()}


def graph_medians(fns: dict[str, Callable[[], object]], *, rounds: int = 3,
                  warm_up_s: float = 0.2) -> dict[str, float]:
    """Milliseconds of each function's CUDA-graph replay (``do_bench`` medians, interleaved
    over ``rounds``), after ``warm_up_s`` seconds of replays bring the card's clocks to where
    they stay under load."""
    import triton

    replays = {name: capture_graph(fn) for name, fn in fns.items()}
    first = next(iter(replays.values()))
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < warm_up_s:
        first()
        torch.cuda.synchronize()

    def bench(fn: Callable[[], object]) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")

    return interleaved_medians(replays, bench, rounds)
