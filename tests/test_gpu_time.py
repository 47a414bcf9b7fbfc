"""Interleaved timing rounds: every function in every round, every other round reversed."""

from moaplan.runtime.gpu_time import interleaved_medians, interleaved_times


def test_rounds_alternate_their_order_and_keep_each_rounds_times_aligned():
    calls: list[str] = []
    fns = {name: (lambda name=name: name) for name in ("a", "b", "c")}

    def bench(fn) -> float:
        calls.append(fn())
        return float(len(calls))  # the time is the call's place in the whole run

    times = interleaved_times(fns, bench, rounds=3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert times == {"a": [1.0, 6.0, 7.0], "b": [2.0, 5.0, 8.0], "c": [3.0, 4.0, 9.0]}
    # Over a pair of rounds each function's mean place is the same: the bias cancels.
    assert {name: sum(ts[:2]) for name, ts in times.items()} == {"a": 7.0, "b": 7.0, "c": 7.0}
    calls.clear()
    assert interleaved_medians(fns, bench, rounds=3) == {"a": 6.0, "b": 5.0, "c": 4.0}
