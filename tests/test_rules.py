"""Densities in closed form agree with brute-force mask counting."""

import numpy as np
import pytest

from moaplan.rules import (
    Rule,
    RuleSpace,
    attention_density,
    block_attention_density,
    density,
    kv_density,
    rule_sinks,
    rule_spans,
)


def brute_mask(sink: int, span: int, n: int) -> np.ndarray:
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    return (j <= i) & ((j < sink) | (i - j < span))


def brute_kv(sink: int, span: int, n: int) -> float:
    # What the cache holds at the end: the keys the last query (position n - 1) sees.
    return brute_mask(sink, span, n)[n - 1].sum() / n


def brute_attention(sink: int, span: int, n: int) -> float:
    return brute_mask(sink, span, n).sum() / (n * (n + 1) / 2)


def brute_blocks(sink: int, span: int, n: int, bm: int, bn: int, edge: int = 0) -> float:
    """Visited keys (those of every ``bm x edge`` tile with a visible entry) over the keys of
    the causal ``bm x bn`` tiles."""
    mask = brute_mask(sink, span, n)
    causal = brute_mask(0, n, n)
    edge = edge or bn
    visited = total = 0
    for q0 in range(0, n, bm):
        total += bn * sum(bool(causal[q0:q0 + bm, k0:k0 + bn].any()) for k0 in range(0, n, bn))
        visited += edge * sum(bool(mask[q0:q0 + bm, k0:k0 + edge].any())
                              for k0 in range(0, n, edge))
    return visited / total


def random_rules(rng: np.random.Generator, count: int) -> list[Rule]:
    rules = [Rule.full_attention()]
    for _ in range(count):
        rules.append(Rule(sink=int(rng.integers(0, 20)), alpha=float(rng.integers(-8, 40)),
                          beta=float(rng.choice([0.0, 0.1, 0.25, 0.5, 1.0, rng.random()])),
                          min_span=int(rng.integers(1, 5)),
                          max_span=None if rng.random() < 0.5 else int(rng.integers(5, 60))))
    return rules


def test_spans_follow_the_formula():
    rule = Rule(sink=4, alpha=10.0, beta=0.25, min_span=3, max_span=30)
    for n in [1, 2, 7, 40, 100, 1000]:
        expected = min(max(int(np.floor(10 + 0.25 * n + 0.5)), 3), min(30, n))
        assert rule.span(n) == expected
    assert Rule.full_attention().span(17) == 17
    # Half-way values round up on every machine (no banker's rounding).
    assert Rule(alpha=2.5).span(100) == 3


@pytest.mark.parametrize("seed", range(5))
def test_densities_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    rules = random_rules(rng, 12)
    lengths = np.array([1, 2, 3, 5, 16, 31, 64, 97])
    sinks, spans = rule_sinks(rules, lengths), rule_spans(rules, lengths)
    kv = kv_density(sinks, spans, lengths)
    att = attention_density(sinks, spans, lengths)
    for r in range(len(rules)):
        for t, n in enumerate(lengths):
            s, w = int(sinks[r, t]), int(spans[r, t])
            assert kv[r, t] == pytest.approx(brute_kv(s, w, n), abs=1e-12)
            assert att[r, t] == pytest.approx(brute_attention(s, w, n), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_block_density_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        n = int(rng.integers(1, 90))
        sink, span = int(rng.integers(0, n + 3)), int(rng.integers(1, n + 3))
        bm, bn = int(rng.choice([4, 8, 16])), int(rng.choice([4, 8, 16]))
        edge = int(rng.choice([x for x in (2, 4, 8, 16) if bn % x == 0]))
        got = block_attention_density(sink, span, n, bm, bn)
        assert got == pytest.approx(brute_blocks(sink, span, n, bm, bn), abs=1e-12)
        got = block_attention_density(sink, span, n, bm, bn, edge)
        assert got == pytest.approx(brute_blocks(sink, span, n, bm, bn, edge), abs=1e-12)


def test_block_density_vectorises_over_heads():
    sinks, spans = np.array([0, 4, 64]), np.array([8, 100, 16])
    got = block_attention_density(sinks, spans, 200, 16)
    assert got.shape == (3,)
    for h in range(3):
        assert got[h] == pytest.approx(brute_blocks(sinks[h], spans[h], 200, 16, 16))


def test_edges():
    # span >= N and sink >= N are both full.
    assert density([Rule.window(500)], 100, "attention")[0] == 1
    assert density([Rule.window(1, sink=500)], 100, "kv")[0] == 1
    # N = 1: the only entry is always kept.
    assert density([Rule.window(1)], 1, "kv")[0] == 1
    assert density([Rule.window(1)], 1, "attention")[0] == 1
    # beta = 0 is a constant window; beta = 1 spans every length (full).
    assert Rule(alpha=64).span(10_000) == 64
    assert (density([Rule(beta=1.0)], [1, 7, 4096], "attention") == 1).all()
    # A window of 1 keeps the diagonal only.
    assert density([Rule.window(1)], 10, "attention")[0] == pytest.approx(10 / 55)


def test_rule_validation():
    with pytest.raises(ValueError, match="sink"):
        Rule(sink=-1)
    with pytest.raises(ValueError, match="beta"):
        Rule(beta=-0.5)
    with pytest.raises(ValueError, match="max_span"):
        Rule(min_span=10, max_span=5)
    with pytest.raises(ValueError, match="unknown density kind"):
        density([Rule()], 10, "flops")


def test_rule_space_is_sized_for_real_models():
    space = RuleSpace()
    assert len(space) >= 200
    assert space.rules[0].full
    assert len(set(space.rules)) == len(space.rules)
    kv = space.density([1024, 4096, 32768])
    assert kv.shape == (len(space), 3)
    assert (kv[0] == 1).all() and (kv > 0).all() and (kv <= 1).all()
    assert RuleSpace.from_dict(space.to_dict()) == space
