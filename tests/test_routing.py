"""Routing a prefill between SDPA and the block-sparse kernel: the choice, and the same result
by every route (the torch reference stands in for the kernel on the CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moaplan.kernels.prefill import reference_attention
from moaplan.rules import Rule
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
    # Every head full: SDPA, which the kernel (efficiency < 1) cannot beat.
    assert choose_route([0] * 32, [FULL] * 32, n, dim).kind == "dense"
    # Narrow windows only: the kernel; SDPA cannot compute a window.
    route = choose_route([64] * 32, [1024] * 32, n, dim)
    assert route.kind == "sparse" and set(route.predicted_s) == {"sparse"}
    # Mostly full heads and a few narrow ones: full heads to SDPA, the rest to the kernel.
    spans = [FULL] * 24 + [512] * 8
    route = choose_route([64] * 32, spans, n, dim)
    assert route.kind == "split" and route.dense == (True,) * 24 + (False,) * 8
    assert route.predicted_s["split"] < min(route.predicted_s["sparse"], 32 * 0.46e-3)
    # A kernel as fast as SDPA and copies that cost much: no reason to split.
    fast = dataclasses.replace(DEFAULT_COST, efficiency_long=1.0, efficiency_short=1.0,
                               copy_tbps=0.01)
    assert choose_route([64] * 32, spans, n, dim, fast).kind == "sparse"
    # Half windows everywhere: the kernel does half the work.
    assert choose_route([64] * 32, [n // 2] * 32, n, dim).kind == "sparse"


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


def test_split_calibration_runs_the_split_route():
    # The calibration's own plumbing, on the CPU with a stand-in timer (1 ms per call).
    calls = []
    bench = lambda fn: calls.append(fn()) or 1.0
    factor = routing._split_factor(bench, torch.device("cpu"), 256, (4, 2), 32, DEFAULT_COST)
    predicted = choose_route([0, 0, 64, 64], [256, 256, 64, 64], 256, 32).predicted_s["split"]
    assert factor == pytest.approx(1e-3 / predicted)
    assert len(calls) == 1 and calls[0].shape == (1, 4, 256, 32)


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
