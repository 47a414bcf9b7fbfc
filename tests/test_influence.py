"""The influence summary: torch and Triton implementations against the naive full-matrix E,
and the dropped influence of rules against the naive sum over the entries they drop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moaplan.errors import ProfileError
from moaplan.profile.cost import dropped_influence
from moaplan.profile.influence import (
    BlockSummary,
    attention_backward,
    attention_forward,
    naive_influence,
    summarize_dense,
)
from moaplan.rules import Rule


def _inputs(b=2, hq=4, hkv=2, n=100, d=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(b, hq, n, d, generator=g).to(device) for _ in range(2))
    k, v = (torch.randn(b, hkv, n, d, generator=g).to(device) for _ in range(2))
    return q, k, v, do, d ** -0.5


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("hq,hkv,n,block,slab", [(4, 2, 100, 16, 32), (3, 3, 64, 16, 1 << 24),
                                                 (4, 1, 37, 8, 8)])
def test_torch_matches_naive_and_sdpa(monkeypatch, hq, hkv, n, block, slab):
    # A small slab forces several query slabs per call, as at long lengths.
    monkeypatch.setattr("moaplan.profile.influence._SLAB_ELEMENTS", 2 * hq * n * slab)
    q, k, v, do, scale = _inputs(hq=hq, hkv=hkv, n=n)
    ref = summarize_dense(naive_influence(q, k, v, do, scale), block, 2, hq)
    o, lse = attention_forward(q, k, v, scale, block)
    summary = BlockSummary.zeros(hq, n, block, 2)  # per query head
    dq, dk, dv = attention_backward(q, k, v, o, lse, do, scale, summary, block)
    assert _rel(summary.far, ref.far) < 1e-5
    assert _rel(summary.sink, ref.sink) < 1e-5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True,
                                                           enable_gqa=True)
    out.backward(do)
    assert _rel(o, out.detach()) < 1e-5
    for mine, theirs in zip((dq, dk, dv), leaves, strict=True):
        assert _rel(mine, theirs.grad) < 1e-4


def test_kv_summary_is_its_query_heads_sum():
    q, k, v, do, scale = _inputs(hq=6, hkv=2, n=50)
    e = naive_influence(q, k, v, do, scale)
    per_query, per_kv = summarize_dense(e, 16, 2, 6), summarize_dense(e, 16, 2, 2)
    assert _rel(per_query.far.reshape(2, 3, -1, 2).sum(1), per_kv.far) < 1e-12
    assert _rel(per_query.sink.reshape(2, 3, 2, -1, 2).sum(1), per_kv.sink) < 1e-12
    # the query heads of one group differ: their own spans can be priced
    assert _rel(per_query.far[0], per_query.far[1]) > 1e-3


def test_summary_layout_by_hand():
    """One entry per cell: i=5, j=1 with b=4 is delta 1, part 0 (1 >= 1), key block 0."""
    e = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    e[0, 0, 5, 1] = 2.0  # delta 1, i mod b = 1 >= j mod b = 1: part 0
    e[0, 0, 4, 3] = 3.0  # delta 1, 0 < 3: part 1
    e[0, 0, 3, 3] = 7.0  # diagonal: never counted
    s = summarize_dense(e, 4, 1, 1)
    assert s.far[0].tolist() == [[0, 0], [2, 3]]
    assert s.sink[0, 0].tolist() == [[0, 0], [2, 3]]


def _naive_dropped(e_abs: np.ndarray, rule: Rule, n: int) -> np.ndarray:
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    sink, span = min(rule.sink, n), int(rule.span(n))
    dropped = (j <= i) & (j >= sink) & (i - j >= span)
    return (e_abs * dropped).sum((-1, -2))


@pytest.mark.parametrize("n", [96, 101])
def test_dropped_influence_equals_naive_sum_for_block_rules(n):
    block, k_sink, hkv = 16, 3, 2
    q, k, v, do, scale = _inputs(hq=4, hkv=hkv, n=n, seed=n)
    e = naive_influence(q, k, v, do, scale)
    s = summarize_dense(e, block, k_sink, hkv)
    e_abs = e.abs().reshape(2, hkv, 2, n, n).sum((0, 2)).numpy()
    rng = np.random.default_rng(n)
    rules = [Rule.full_attention()] + [
        Rule.window(int(rng.integers(1, n // block + 2)) * block,
                    sink=int(rng.integers(0, k_sink + 1)) * block) for _ in range(25)]
    cost = dropped_influence(s.far.numpy(), s.sink.numpy(), rules, n, block)
    naive = np.stack([_naive_dropped(e_abs, r, n) for r in rules], 1)
    assert cost.shape == (hkv, len(rules))
    assert np.all(cost[:, 0] == 0)
    np.testing.assert_allclose(cost, naive, rtol=1e-9, atol=1e-12)


def test_partial_spans_interpolate_between_block_multiples():
    n, block = 80, 16
    q, k, v, do, scale = _inputs(hq=2, hkv=2, n=n)
    s = summarize_dense(naive_influence(q, k, v, do, scale), block, 1, 2)
    far, sink = s.far.numpy(), s.sink.numpy()
    lo, mid, hi = (dropped_influence(far, sink, [Rule.window(w, sink=16)], n, block)[:, 0]
                   for w in (32, 40, 48))
    np.testing.assert_allclose(mid, (lo + hi) / 2)
    assert np.all(dropped_influence(far, sink, [Rule.window(n, sink=16)], n, block) == 0)


def test_unpriceable_sink_is_a_profile_error():
    far, sink = np.ones((1, 4, 2)), np.ones((1, 1, 4, 2))
    with pytest.raises(ProfileError, match="sink"):
        dropped_influence(far, sink, [Rule.window(16, sink=8)], 64, 16)
    with pytest.raises(ProfileError, match="sink"):
        dropped_influence(far, sink, [Rule.window(16, sink=32)], 64, 16)


_INTERPRETER_SCRIPT = r"""
import json, torch
from moaplan.kernels.influence import influence_summary
from moaplan.profile.influence import (BlockSummary, attention_forward, naive_influence,
                                       summarize_dense)
out = {}
for hq, hkv, n, d in [(4, 2, 100, 32), (2, 2, 48, 24)]:
    g = torch.Generator().manual_seed(n)
    q, do = (torch.randn(2, hq, n, d, generator=g) for _ in range(2))
    k, v = (torch.randn(2, hkv, n, d, generator=g) for _ in range(2))
    scale = d ** -0.5
    for dtype in (torch.float32, torch.float16):
        qc, kc, vc, dc = (t.to(dtype) for t in (q, k, v, do))
        ref = summarize_dense(naive_influence(qc, kc, vc, dc, scale), 16, 2, hq)
        o, lse = attention_forward(qc.float(), kc.float(), vc.float(), scale, 16)
        for row_blocks in (1, 2):
            s = BlockSummary.zeros(hq, n, 16, 2)
            influence_summary(qc, kc, vc, dc, lse, (dc.float() * o).sum(-1), scale, 16, s.far,
                              s.sink, row_blocks=row_blocks)
            err = max(float((a.double() - b).abs().max() / b.abs().max())
                      for a, b in ((s.far, ref.far), (s.sink, ref.sink)))
            out[f"{hq}/{hkv}/{n}/{d}/{row_blocks}/{str(dtype)[6:]}"] = err
print(json.dumps(out))
"""


def test_triton_kernel_matches_naive_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, err in errors.items():
        assert err < (1e-5 if case.endswith("float32") else 2e-3), (case, err)
    assert len(errors) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_bf16_on_gpu():
    from moaplan.kernels.influence import influence_summary

    q, k, v, do, scale = _inputs(hq=8, hkv=2, n=1000, d=128, device="cuda")
    q, k, v, do = (t.bfloat16() for t in (q, k, v, do))
    ref = summarize_dense(naive_influence(q, k, v, do, scale), 64, 2, 8)
    o, lse = attention_forward(q.float(), k.float(), v.float(), scale, 64)
    s = BlockSummary.zeros(8, 1000, 64, 2, "cuda")
    influence_summary(q, k, v, do, lse, (do.float() * o).sum(-1), scale, 64, s.far, s.sink)
    assert _rel(s.far, ref.far) < 2e-2
    assert _rel(s.sink, ref.sink) < 2e-2
