"""The reference attention against a naive loop over (head, query, key)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moaplan.kernels.prefill import reference_attention
from moaplan.rules import visible


def naive_attention(q, k, v, sink, span, scale, q_offset, seq_lens, compensate=None):
    """One softmax per (batch, query head, query), keys chosen by the rule one at a time; a
    compensating head adds one entry: the mean dropped key and value, weighted by the count."""
    batch, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.zeros(batch, hq, nq, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(hq):
            kv = h // (hq // hkv)
            for t in range(nq):
                i = int(q_offset[b]) + t
                if i >= seq_lens[b]:
                    continue
                causal = [j for j in range(min(nk, int(seq_lens[b]))) if j <= i]
                keys = [j for j in causal if j < sink[kv] or i - j < span[kv]]
                dropped = [j for j in causal if j not in keys]
                logits = [float(q[b, h, t] @ k[b, kv, j]) * scale for j in keys]
                values = [v[b, kv, j] for j in keys]
                if compensate is not None and compensate[kv] and dropped:
                    mean_k = torch.stack([k[b, kv, j] for j in dropped]).mean(0)
                    logits.append(float(q[b, h, t] @ mean_k) * scale + math.log(len(dropped)))
                    values.append(torch.stack([v[b, kv, j] for j in dropped]).mean(0))
                if not logits:
                    continue
                weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                for w, value in zip(weights, values, strict=True):
                    out[b, h, t] += w * value
    return out


def test_visible_follows_the_rule_convention():
    # sink 1, span 2 at query 4: the sink key 0 and the window keys 3, 4; never future key 5.
    seen = visible(torch.tensor(1), torch.tensor(2), torch.tensor(4), torch.arange(6))
    assert seen.tolist() == [True, False, False, True, True, False]


@pytest.mark.parametrize("seed", range(12))
def test_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    batch, hkv, group = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    nk, dim = int(rng.integers(1, 14)), 4
    nq = int(rng.integers(1, nk + 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * group, nq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, nk, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, nk, dim, generator=gen, dtype=torch.float64)
    # Edges included: sink 0, sink >= Nk, span 1, span >= Nk (full).
    sink = torch.from_numpy(rng.integers(0, nk + 2, hkv))
    span = torch.from_numpy(rng.integers(1, nk + 3, hkv))
    seq_lens = torch.from_numpy(rng.integers(0, nk + 1, batch))
    q_offset = torch.from_numpy(rng.integers(0, nk - nq + 1, batch))
    got = reference_attention(q, k, v, sink, span, scale=0.7, q_offset=q_offset,
                              seq_lens=seq_lens)
    want = naive_attention(q, k, v, sink.tolist(), span.tolist(), 0.7, q_offset, seq_lens)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(10))
def test_compensation_matches_naive_loop(seed):
    rng = np.random.default_rng(100 + seed)
    batch, hkv, group = int(rng.integers(1, 3)), int(rng.integers(2, 4)), int(rng.integers(1, 3))
    nk, dim = int(rng.integers(2, 16)), 4
    nq = int(rng.integers(1, nk + 1))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * group, nq, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, hkv, nk, dim, generator=gen, dtype=torch.float64)
            for _ in range(2))
    sink = torch.from_numpy(rng.integers(0, 4, hkv))
    span = torch.from_numpy(rng.integers(1, nk + 1, hkv))
    compensate = torch.tensor([True] + [bool(c) for c in rng.integers(0, 2, hkv - 1)])
    seq_lens = torch.from_numpy(rng.integers(0, nk + 1, batch))
    q_offset = torch.from_numpy(rng.integers(0, nk - nq + 1, batch))
    got = reference_attention(q, k, v, sink, span, scale=0.7, q_offset=q_offset,
                              seq_lens=seq_lens, compensate=compensate)
    want = naive_attention(q, k, v, sink.tolist(), span.tolist(), 0.7, q_offset, seq_lens,
                           compensate.tolist())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_compensation_changes_only_rows_that_drop_keys():
    # Span 2, no sink, 6 keys: rows 0 and 1 drop nothing, rows 2.. drop 1, 2, 3, 4 keys.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    sink, span = torch.tensor([0, 0]), torch.tensor([2, 6])
    plain = reference_attention(q, k, v, sink, span)
    comp = reference_attention(q, k, v, sink, span, compensate=torch.tensor([1, 1]))
    assert torch.equal(comp[:, :, :2], plain[:, :, :2])  # nothing dropped: no extra entry
    assert torch.equal(comp[:, 1], plain[:, 1])  # a full head ignores compensate
    assert not torch.isclose(comp[:, 0, 2:], plain[:, 0, 2:]).all(-1).any()


def test_int_offset_and_default_scale_match_naive_loop():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    sink, span = torch.tensor([2, 0]), torch.tensor([3, 100])
    got = reference_attention(q, k, v, sink, span, q_offset=6)
    want = naive_attention(q, k, v, [2, 0], [3, 100], 1 / math.sqrt(8), [6, 6], [9, 9])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_padding_rows_are_zero_and_dtype_is_kept():
    q = torch.randn(1, 2, 5, 4, dtype=torch.float16)
    k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float16) for _ in range(2))
    out = reference_attention(q, k, v, torch.tensor([1]), torch.tensor([2]),
                              seq_lens=torch.tensor([3]))
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert (out[:, :, 3:] == 0).all() and (out[:, :, :3] != 0).any()


def test_full_rule_equals_causal_sdpa_at_4k_with_8_kv_heads():
    # The size kernel tests use: it must run in bounded memory on the CPU.
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 8, 4096, 16, generator=gen) for _ in range(3))
    full = torch.full((8,), 4096)
    got = reference_attention(q, k, v, torch.zeros(8, dtype=torch.int64), full)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shape_errors_are_clear():
    q, k = torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        reference_attention(q, k, k, torch.zeros(2), torch.ones(2))
    q = torch.zeros(1, 4, 2, 4)
    with pytest.raises(ValueError, match="one entry per KV head"):
        reference_attention(q, k, k, torch.zeros(3), torch.ones(3))
