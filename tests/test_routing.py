"""Routing a prefill between SDPA and the block-sparse kernel: the choice, and the same result
by every route (the torch reference stands in for the kernel on the CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moaplan.kernels.prefill import default_config, reference_attention
from moaplan.rules import Rule, block_attention_density
from moaplan.runtime import routing
from moaplan.runtime.layer import layer_attention
from moaplan.runtime.routing import DEFAULT_COST, CostModel, choose_route, routed_attention

FULL = 2**40


def _qkv(seed, batch, hq, hkv, n, dim=32, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, h, n, dim, generator=gen).to(device, dtype)
            for h in (hq, hkv, hkv))


def test_choice_follows_the_cost():
    n, dim = 32768, 128
    # Every head full: SDPA, whatever the cost model rates the kernel.
    assert choose_route([0] * 32, [FULL] * 32, n, dim).kind == "dense"
    # Narrow windows only: the kernel; SDPA cannot compute a window.
    route = choose_route([64] * 32, [1024] * 32, n, dim)
    assert route.kind == "sparse" and set(route.predicted_s) == {"sparse"}
    # Mostly full heads and a few narrow ones, on a kernel slower than SDPA on full tiles:
    # full heads to SDPA, the rest to the kernel.
    spans = [FULL] * 24 + [512] * 8
    slow = dataclasses.replace(DEFAULT_COST, efficiency_long=0.9)
    route = choose_route([64] * 32, spans, n, dim, slow)
    assert route.kind == "split" and route.dense == (True,) * 24 + (False,) * 8
    assert route.predicted_s["split"] < min(route.predicted_s["sparse"], 32 * 0.46e-3)
    # A kernel as fast as SDPA and copies that cost much: no reason to split.
    fast = dataclasses.replace(DEFAULT_COST, efficiency_long=1.0, efficiency_short=1.0,
                               copy_tbps=0.01)
    assert choose_route([64] * 32, spans, n, dim, fast).kind == "sparse"
    # Half windows everywhere: the kernel does half the work.
    assert choose_route([64] * 32, [n // 2] * 32, n, dim).kind == "sparse"
    # The split route's measured excess shrinks as 1/N from where it was measured.
    costly = dataclasses.replace(DEFAULT_COST, split_short=1.4, split_long=1.2)
    assert costly.split(dim, 4096) == pytest.approx(1.4)
    assert costly.split(dim, 2048) == pytest.approx(1.8)
    assert costly.split(dim, 16384) == pytest.approx(1.2)
    assert costly.split(dim, 65536) == pytest.approx(1.05)


@pytest.mark.parametrize("with_compensation", [False, True])  # the windowed path, the reference
@pytest.mark.parametrize("route", ["sparse", "split", "dense"])
def test_every_route_gives_the_reference(route, with_compensation):
    hkv, group, n = 4, 4, 96
    q, k, v = _qkv(1, 2, hkv * group, hkv, n)
    if route == "dense":
        sink, span = torch.tensor([0, 0, 3, 0]), torch.tensor([FULL, n, n - 3, FULL])
    else:  # per-query-head spans: full, windowed and narrow heads in one group
        sink = torch.tensor([0, 4, 0, 2])
        span = torch.tensor([FULL] * 4 + [FULL, 30, 7, FULL] + [40] * 4 + [FULL, 1, 96, 50])
    # KV head 2 has one span for its group, as the compensation token needs.
    compensate = torch.tensor([False, False, with_compensation, False])
    ref = reference_attention(q, k, v, sink, span, compensate=compensate, scale=0.2)
    out = routed_attention(q, k, v, sink, span, compensate=compensate, scale=0.2, route=route)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gqa_native", [True, False])
def test_split_route_hands_sdpa_whole_groups_their_own_keys(monkeypatch, gqa_native):
    # Full groups in two runs (KV heads 0 and 2-3) around a windowed one: SDPA gets the
    # full groups' queries and their 3 KV heads, not keys repeated per query head.
    monkeypatch.setattr(routing, "DEFAULT_COST", CostModel(gqa_native=gqa_native))
    shapes = []
    dense = routing.dense_attention
    monkeypatch.setattr(routing, "dense_attention",
                        lambda q, k, v, **kw: shapes.append((q.shape[1], k.shape[1]))
                        or dense(q, k, v, **kw))
    q, k, v = _qkv(5, 2, 8, 4, 64)
    sink, span = torch.tensor([0, 4, 0, 0]), torch.tensor([FULL, 20, FULL, 64])
    out = routed_attention(q, k, v, sink, span, scale=0.3, route="split")
    torch.testing.assert_close(out, reference_attention(q, k, v, sink, span, scale=0.3),
                               atol=1e-5, rtol=1e-5)
    assert shapes == [(6, 3)]


def test_chunks_and_padding_stay_on_the_kernel(monkeypatch):
    calls = []
    sparse = routing._sparse
    monkeypatch.setattr(routing, "_sparse", lambda *a, **kw: calls.append(kw) or sparse(*a, **kw))
    # SDPA with native GQA: an all-full layer is always dense.
    monkeypatch.setattr(routing, "DEFAULT_COST", CostModel(gqa_native=True))
    q, k, v = _qkv(2, 1, 4, 2, 50)
    sink, span = torch.tensor([0, 0]), torch.tensor([FULL, FULL])
    chunk = routed_attention(q[:, :, 30:], k, v, sink, span, q_offset=30)
    ref = reference_attention(q[:, :, 30:], k, v, sink, span, q_offset=30)
    torch.testing.assert_close(chunk, ref)
    assert len(calls) == 1  # a chunk after context is no whole-prompt prefill
    whole = routed_attention(q, k, v, sink, span)  # all full: SDPA
    torch.testing.assert_close(whole, reference_attention(q, k, v, sink, span),
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 1


def test_layer_attention_routes_query_windows():
    rules = [Rule.full_attention(),
             Rule(sink=4, alpha=20.0, beta=0.25, query_windows=((0.0, 1.0), (5.0, 0.0)))]
    q, k, v = _qkv(3, 1, 4, 2, 80)
    spans = torch.tensor([80, 80, 40, 5])  # the windows, capped at the rule's span (40)
    ref = reference_attention(q, k, v, torch.tensor([0, 4]), spans)
    torch.testing.assert_close(layer_attention(rules, q, k, v, None), ref, atol=1e-5,
                               rtol=1e-5)


def test_cost_model_is_read_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("MOAPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(routing.torch.cuda, "get_device_name", lambda device=None: "Card X")
    monkeypatch.setattr(routing.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(routing, "_COSTS", {})
    saved = CostModel(sdpa_tflops=123.0, efficiency_long=0.9, gqa_native=True)
    path = routing._cache_file(torch.device("cuda", 0))
    assert path.parent == tmp_path and "Card_X" in path.name
    path.write_text(json.dumps(dataclasses.asdict(saved)))
    assert routing.cost_model(torch.device("cuda", 0)) == saved
    # A card that cannot be measured (out of memory, say) routes by the defaults.
    path.unlink()
    monkeypatch.setattr(routing, "_COSTS", {})

    def fail(device):
        raise torch.cuda.OutOfMemoryError("no room")

    monkeypatch.setattr(routing, "calibrate", fail)
    assert routing.cost_model(torch.device("cuda", 0)) == DEFAULT_COST
    assert not path.exists()


def test_calibration_derives_the_cost_model_from_its_timings():
    # The calibration's own plumbing on the CPU, with a stand-in timer that runs every
    # function once and reports the times of a made-up card: SDPA at 100 TFLOP/s (150% of
    # that time with enable_gqa, 120% repeating the keys in the call), the kernel at 80% of
    # SDPA's speed on the tiles it visits, the split route 1 ms, a copy at 1 TB/s.
    heads, dim, lengths = (4, 2), 32, (128, 256)
    outputs = {}

    def timer(fns):
        outputs.update({name: fn() for name, fn in fns.items()})
        ms = {"copy": 2 * (4 * 256 * 32 * 2) / 1e12 * 1e3}  # the longest layer's q, bf16
        for n in lengths:
            dense = 4 * dim * n * (n + 1) / 2 * heads[0] / 100e12 * 1e3
            ms |= {f"{n}/sdpa": dense, f"{n}/sdpa_gqa": 1.5 * dense,
                   f"{n}/sdpa_repeat": 1.2 * dense, f"{n}/split": 1.0}
            for name, (sink, share) in routing._CalibrationLayers.WINDOWED.items():
                cfg = default_config(dim, min(sink + int(share * n), n))
                ms[f"{n}/{name}"] = dense / 0.8 * float(block_attention_density(
                    sink, int(share * n), n, cfg.block_m, cfg.block_n))
        return ms

    cost = routing.calibrate(torch.device("cpu"), heads=heads, head_dim=dim, lengths=lengths,
                             timer=timer)
    assert cost.sdpa_tflops == pytest.approx(100.0)
    assert cost.efficiency_short == pytest.approx(0.8) == cost.efficiency_long
    assert cost.copy_tbps == pytest.approx(1.0) and not cost.gqa_native
    assert set(outputs) == {f"{n}/{name}" for n in lengths for name in
                            ("sdpa", "sdpa_gqa", "sdpa_repeat", "full", "half", "split")
                            } | {"copy"}
    unsplit = dataclasses.replace(cost, split_short=1.0, split_long=1.0)
    for name, n in zip(("short", "long"), lengths):
        layer = routing._CalibrationLayers(torch.device("cpu"), n, heads, dim)
        # The split factor: the measured time over the prediction.
        assert getattr(cost, f"split_{name}") == pytest.approx(
            1e-3 / layer.predicted_split(unsplit))
        # What was timed as the split route computes the layer's rules.
        ref = reference_attention(*(x.float() for x in (layer.q, layer.k, layer.v)),
                                  torch.from_numpy(layer.split_sinks),
                                  torch.from_numpy(layer.split_spans))
        torch.testing.assert_close(outputs[f"{n}/split"].float(), ref, atol=2e-2, rtol=2e-2)


def test_calibration_rates_sdpa_as_the_dense_route_calls_it():
    # A card whose SDPA with enable_gqa (the dense route's call) runs 10% faster than SDPA on
    # keys repeated beforehand, and whose kernel computes an all-full layer 2% slower than
    # the route's call: rated against the slower call, the kernel would look faster than the
    # dense route.
    heads, dim, lengths = (4, 2), 32, (128, 256)

    def timer(fns):
        ms = {"copy": 1.0}
        for n in lengths:
            gqa = 4 * dim * n * (n + 1) / 2 * heads[0] / 100e12 * 1e3
            ms |= {f"{n}/sdpa": 1.1 * gqa, f"{n}/sdpa_gqa": gqa, f"{n}/sdpa_repeat": 1.2 * gqa,
                   f"{n}/split": 1.0, f"{n}/full": 1.02 * gqa, f"{n}/half": 0.6 * gqa}
        return ms

    cost = routing.calibrate(torch.device("cpu"), heads=heads, head_dim=dim, lengths=lengths,
                             timer=timer)
    assert cost.gqa_native and cost.sdpa_tflops == pytest.approx(100.0)
    assert cost.efficiency_long < 1
    # An all-full layer goes to SDPA even where a cost model rates the kernel faster.
    fast = dataclasses.replace(cost, efficiency_long=1.5)
    assert choose_route([0] * 4, [4096] * 4, 4096, dim, fast, group=2).kind == "dense"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("route", ["sparse", "split", "dense"])
def test_bf16_routes_on_gpu_within_sdpa_error(route):
    hkv, group, n = 8, 4, 2048
    q, k, v = _qkv(4, 1, hkv * group, hkv, n, 128, torch.bfloat16, "cuda")
    sink = torch.tensor([0] * 6 + [64, 64]) if route != "dense" else torch.zeros(8, dtype=int)
    span = torch.tensor([FULL] * 6 + [256, n // 2]) if route != "dense" else (
        torch.full((8,), FULL))
    out = routed_attention(q, k, v, sink, span, route=route)
    ref = reference_attention(q.float(), k.float(), v.float(), sink, span)
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    allowed = (sdpa.float() - reference_attention(q.float(), k.float(), v.float(),
                                                  torch.zeros(8), torch.full((8,), FULL))
               ).abs().max().item()
    assert not out.isnan().any()
    assert (out.float() - ref).abs().max().item() <= 1.5 * allowed


def test_the_cost_model_prices_each_head_by_the_pack_it_runs_in():
    """The kernel packs the query heads of a group that share a rule; the router prices each
    head's tiles at its pack's rows (fewer rows, less window-edge waste), also for the subset
    of heads a split route hands the kernel."""
    import numpy as np

    n = 16384
    sink = np.full(8, 64)
    span = np.array([3000] * 4 + [3000, 5000, 3000, 7000])
    cfg = default_config(128, 7064)
    assert (cfg.block_m, cfg.pack) == (128, 4)

    def share(w: int, rows: int) -> float:
        return float(block_attention_density(64, w, n, rows, cfg.block_n, cfg.masked_n))

    tiles, reach = routing._kernel_tiles(sink, span, np.ones(8, dtype=bool), n, 128, 4)
    assert reach == 7064
    assert tiles.tolist() == pytest.approx([share(3000, 32)] * 4 + [
        share(3000, 64), share(5000, 128), share(3000, 64), share(7000, 128)])
    assert share(3000, 32) <= share(3000, 64) < share(3000, 128)
    # Without head 0 (sent to SDPA), its group's other three pack 2 + 1.
    some = np.arange(8) > 0
    tiles, _ = routing._kernel_tiles(sink, span, some, n, 128, 4)
    assert tiles[:3].tolist() == pytest.approx([share(3000, 64)] * 2 + [share(3000, 128)])
    # The reach is capped at the keys, as the launch caps it: sinks beside a full window.
    _, reach = routing._kernel_tiles(sink, np.full(8, n), np.ones(8, dtype=bool), n, 128, 4)
    assert reach == n
