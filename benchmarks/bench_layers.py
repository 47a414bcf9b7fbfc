"""Layer by layer: a MoA-like plan's prefill against dense SDPA, on one GPU.

    python benchmarks/bench_layers.py [--out DIR] [--lengths 4096 16384 32768 65536] [--rounds 3]

The plan: 8 layers of a Llama-3-8B-shaped attention (32 query / 8 KV heads, head_dim 128,
bf16, batch 1) drawn like MoA's published plans (per query head ``alpha + beta * N`` with 64
sinks; a share of full heads growing with depth), converted by ``moaplan convert moa``'s code:
one rule per KV head (the widest of its group of 4, what the cache keeps) carrying its query
heads' own spans as query windows.  Per layer and length it times, as CUDA-graph replays (the
GPU's time alone), ours and the baselines taking turns in every round:

- ``kv``: ``routed_attention`` with the per-KV-head rules (what the library runs without
  query windows), ``q``: the same with the query windows, ``kernel``: the per-KV-head rules
  on the block-sparse kernel alone (no routing: what the library ran before);
- ``sdpa``: dense causal SDPA (default backend, cuDNN on Hopper) on keys repeated per query
  head beforehand (the repeat not timed), ``sdpa_gqa``: SDPA with ``enable_gqa``; the dense
  baseline of each ratio is the faster of the two.

Each speedup comes with the 95% t-interval of its geometric mean over the rounds (dense over
ours within a round, so the rounds' common drift cancels); a layer whose interval holds 1 ties
dense.  It also reports the routing cost model measured on this card, each layer's route, the
closed-form ideal (attention density x T_dense), and the bf16 error of both routed variants
against the fp32 reference at the shortest length, beside SDPA's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from timing import ROUNDS, Speedup, bench_rounds  # noqa: E402

from moaplan.io import atomic_write_text
from moaplan.kernels.layout import RuleTable
from moaplan.kernels.prefill import reference_attention, sparse_attention
from moaplan.plan.interop import moa_rules_from_json
from moaplan.rules import Rule, density
from moaplan.runtime.gpu_time import capture_graph
from moaplan.runtime.routing import choose_route, cost_model, dense_attention, routed_attention

LAYERS, HQ, HKV, DIM = 8, 32, 8, 128
GROUP = HQ // HKV


def moa_like_rules(seed: int = 1, same: float = 0.6) -> list[list[Rule]]:
    """MoA-like per-query-head ``(alpha, beta)`` for ``LAYERS`` layers, as moaplan rules.

    Per group of 4 query heads a base rule (full with a probability growing with depth as
    ``(layer / 7)^2``, else beta in {0, .1, .2, .3, .5} and alpha in {1K, 2K, 4K}); each further
    member keeps it with probability ``same``, else takes a narrower one (beta <= .2, alpha
    512 or 1K).  Seed 1 gives per-layer attention densities at 32K of 0.57-1.00 by KV head
    (closed-form ideal 1.34x dense over the layers) and 1.71x with the query windows, close to
    MoA's Llama-3-8B plan (1.31x and 1.72x)."""
    rng = np.random.default_rng(seed)
    alphas, betas = np.zeros((LAYERS, HQ)), np.zeros((LAYERS, HQ))
    betas_by = [0.0, 0.1, 0.2, 0.3, 0.5]
    for layer in range(LAYERS):
        full_share = (layer / (LAYERS - 1)) ** 2
        for g in range(HKV):
            full = rng.random() < full_share
            base = (1.0, 0.0) if full else (rng.choice(betas_by), rng.choice([1024, 2048, 4096]))
            for m in range(GROUP):
                h = g * GROUP + m
                if m == 0 or rng.random() < same:
                    betas[layer, h], alphas[layer, h] = base
                else:
                    betas[layer, h] = rng.choice(betas_by[:3])
                    alphas[layer, h] = rng.choice([512, 1024])
    return moa_rules_from_json({"alphas": alphas.tolist(), "betas": betas.tolist()}, GROUP)


def per_kv_head(rules: list[Rule]) -> list[Rule]:
    return [dataclasses.replace(r, query_windows=None) for r in rules]


def inputs(n: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(1, h, n, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                 for h in (HQ, HKV, HKV))


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref).norm() / ref.norm()).item()


def check(layers: list[list[Rule]], n: int) -> list[dict]:
    """bf16 error of the routed variants against the fp32 reference, beside SDPA's own."""
    q, k, v = inputs(n, seed=1)
    qf, kf, vf = q.float(), k.float(), v.float()
    kx, vx = k.repeat_interleave(GROUP, 1), v.repeat_interleave(GROUP, 1)
    full = torch.zeros(HKV, dtype=torch.long), torch.full((HKV,), n)
    sdpa_err = rel_error(F.scaled_dot_product_attention(q, kx, vx, is_causal=True),
                         reference_attention(qf, kf, vf, *full))
    rows = []
    for i, rules in enumerate(layers):
        row = {"layer": i, "n": n, "sdpa_rel": sdpa_err}
        for name, variant in (("kv", per_kv_head(rules)), ("q", rules)):
            heads = RuleTable.of(variant).at(n, GROUP)
            out = routed_attention(q, k, v, heads.sink, heads.span)
            ref = reference_attention(qf, kf, vf, heads.sink, heads.span)
            row[f"{name}_rel"] = rel_error(out, ref)
            row[f"{name}_nan"] = bool(out.isnan().any())
        rows.append(row)
    return rows


def time_length(layers: list[list[Rule]], n: int, rounds: int, log) -> dict:
    q, k, v = inputs(n, seed=n)
    kx, vx = k.repeat_interleave(GROUP, 1), v.repeat_interleave(GROUP, 1)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, kx, vx, is_causal=True),
           "sdpa_gqa": lambda: dense_attention(q, k, v, scale=None, gqa_native=True)}
    cost = cost_model(q.device)
    routes = []
    for i, rules in enumerate(layers):
        kv_heads = RuleTable.of(per_kv_head(rules)).at(n, GROUP)
        q_heads = RuleTable.of(rules).at(n, GROUP)
        # Each layer's own dense baseline, timed beside it in every round (before it, and
        # after it in the reversed rounds): the card's speed drifts over a round (clocks,
        # heat) by more than some margins.
        fns[f"dense{i}"] = fns["sdpa_gqa"]
        fns[f"kv{i}"] = lambda h=kv_heads: routed_attention(q, k, v, h.sink, h.span)
        fns[f"q{i}"] = lambda h=q_heads: routed_attention(q, k, v, h.sink, h.span)
        fns[f"kernel{i}"] = lambda h=kv_heads: sparse_attention(q, k, v, h.sink, h.span)
        routes.append({
            name: choose_route(np.repeat(h.sink.numpy(), GROUP), h.span.numpy()
                               if h.span.numel() == HQ else np.repeat(h.span.numpy(), GROUP),
                               n, DIM, cost, GROUP).kind
            for name, h in (("kv", kv_heads), ("q", q_heads))})
    samples = bench_rounds({name: capture_graph(fn) for name, fn in fns.items()}, rounds)
    times = {name: statistics.median(ts) for name, ts in samples.items()}
    rows = []
    for i, rules in enumerate(layers):
        d_kv = float(density(per_kv_head(rules), n, "attention").mean())
        d_q = float(density(rules, n, "attention").mean())
        t = {name: times[f"{name}{i}"] for name in ("kv", "q", "kernel")}
        dense = times[f"dense{i}"]
        rows.append({"layer": i, "n": n, "density_kv": d_kv, "density_q": d_q, "ms": t,
                     "route": routes[i], "dense_ms": dense,
                     "speedup": {name: dense / t[name] for name in t},
                     "speedup_ci": {name: dataclasses.asdict(Speedup.paired(
                         samples[f"dense{i}"], samples[f"{name}{i}"])) for name in t},
                     "eta_kv": d_kv * dense / t["kv"], "eta_q": d_q * dense / t["q"]})
        log(f"N={n} layer {i}: d_kv {d_kv:.2f} d_q {d_q:.2f}  kv {t['kv']:.3f} ({routes[i]['kv']})"
            f" q {t['q']:.3f} ({routes[i]['q']}) kernel {t['kernel']:.3f}  dense {dense:.3f} ms")
    total = {name: sum(r["ms"][name] for r in rows) for name in ("kv", "q", "kernel")}
    dense_total = sum(r["dense_ms"] for r in rows)
    ideal = {name: sum(r[f"density_{name}"] for r in rows) / len(rows) for name in ("kv", "q")}
    round_sums = {name: np.sum([samples[f"{name}{i}"] for i in range(len(layers))], axis=0)
                  for name in ("dense", "kv", "q", "kernel")}
    return {"n": n, "sdpa_ms": times["sdpa"], "sdpa_gqa_ms": times["sdpa_gqa"],
            "dense_total_ms": dense_total, "layers": rows, "total_ms": total,
            "speedup": {name: dense_total / total[name] for name in total},
            "speedup_ci": {name: dataclasses.asdict(Speedup.paired(round_sums["dense"],
                                                                   round_sums[name]))
                           for name in total},
            "ideal_speedup": {name: 1 / d for name, d in ideal.items()}}


def _speedup(record: dict) -> Speedup:
    return Speedup(**record)


def _windowed(layer: dict, name: str) -> bool:
    """Whether variant ``name`` of ``layer`` ran windowed.  On the dense route it makes the
    dense baseline's own SDPA call, so any gap there is the measurement's own error, not a
    slower layer."""
    return layer["route"][name] != "dense"


def _verdict(layer: dict, name: str) -> str:
    """A layer's speedup with its interval, and "tie" where the interval holds 1."""
    ci = _speedup(layer["speedup_ci"][name])
    return f"{ci}{' tie' if ci.against(1.0) == 'tie' else ''}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    out = [f"# Layer by layer: a MoA-like plan on {meta['card']}", "",
           f"{meta['date']}, commit `{meta['commit']}`, torch {meta['torch']}, triton "
           f"{meta['triton']}.  {LAYERS} layers, B=1, 32 q / 8 KV heads, D=128, bf16.  Times: "
           f"CUDA-graph replays (the GPU's time alone), median of {result['rounds']} rounds of "
           "do_bench medians with every variant taking turns, every other round in reverse "
           "order; [low, high]: the 95% t-interval "
           "of the speedup's geometric mean over the rounds (each round's dense time over ours "
           "in that round), \"tie\" where it holds 1.  Dense: SDPA (default backend, cuDNN) "
           "with enable_gqa, the faster dense setup here (SDPA on keys repeated beforehand, "
           "the repeat not timed, is given once per length), timed beside each layer in "
           "every round; speedups over all layers are the sum of the layers' dense times "
           "over the sum of ours.  kv: per-KV-head "
           "rules (the widest span of each group of 4), routed; q: the query heads' own spans "
           "(query windows), routed; kernel: per-KV-head rules on the block-sparse kernel "
           "alone (before routing).  Speedups are dense / ours.", "",
           f"Cost model measured on this card: `{result['cost_model']}`", "",
           "## Over all layers", "",
           "| N | SDPA repeated-keys ms | dense ms | kv ms | q ms | kernel ms | kv vs dense | "
           "q vs dense | kernel vs dense | ideal kv | ideal q | slowest windowed layer (kv / q) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["lengths"]:
        slow = {name: _speedup(min((x["speedup_ci"][name] for x in r["layers"]
                                    if _windowed(x, name)),
                                   key=lambda ci: ci["mean"])) for name in ("kv", "q")}
        out.append(f"| {r['n']} | {LAYERS * r['sdpa_ms']:.2f} | {r['dense_total_ms']:.2f} | "
                   f"{r['total_ms']['kv']:.2f} | {r['total_ms']['q']:.2f} | "
                   f"{r['total_ms']['kernel']:.2f} | {_speedup(r['speedup_ci']['kv'])} | "
                   f"{_speedup(r['speedup_ci']['q'])} | {r['speedup']['kernel']:.2f}x | "
                   f"{r['ideal_speedup']['kv']:.2f}x | {r['ideal_speedup']['q']:.2f}x | "
                   f"{slow['kv']} / {slow['q']} |")
    below = [(r["n"], x, name) for r in result["lengths"] for x in r["layers"]
             for name in ("kv", "q") if _speedup(x["speedup_ci"][name]).against(1.0) == "below"]
    windowed = [b for b in below if _windowed(b[1], b[2])]
    controls = [b for b in below if not _windowed(b[1], b[2])]

    def named(items: list[tuple]) -> str:
        return ", ".join(f"{n} layer {x['layer']} {name} {_speedup(x['speedup_ci'][name])}"
                         for n, x, name in items)

    out += ["", "Layers slower than dense (the whole interval below 1): "
            + (named(windowed) or "none") + "."]
    if controls:
        out[-1] += (" On the dense route, which makes the dense baseline's own SDPA call, so "
                    "that the gap is the measurement's own error: " + named(controls) + ".")
    out += ["", "## Per layer", "",
            "| N | layer | density kv | density q | route kv | route q | kv ms | q ms | "
            "kernel ms | dense ms | kv vs dense | q vs dense | kernel vs dense | eta kv | "
            "eta q |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["lengths"]:
        for x in r["layers"]:
            s, t = x["speedup"], x["ms"]
            out.append(f"| {x['n']} | {x['layer']} | {x['density_kv']:.3f} | "
                       f"{x['density_q']:.3f} | {x['route']['kv']} | {x['route']['q']} | "
                       f"{t['kv']:.3f} | {t['q']:.3f} | {t['kernel']:.3f} | "
                       f"{x['dense_ms']:.3f} | {_verdict(x, 'kv')} | {_verdict(x, 'q')} | "
                       f"{s['kernel']:.2f}x | {x['eta_kv']:.2f} | {x['eta_q']:.2f} |")
    out += ["", "## Correctness (bf16 vs the fp32 reference, relative L2 error)", "",
            "| N | layer | kv | q | SDPA dense (own error) | NaN |", "|---|---|---|---|---|---|"]
    for c in result["correctness"]:
        out.append(f"| {c['n']} | {c['layer']} | {c['kv_rel']:.2e} | {c['q_rel']:.2e} | "
                   f"{c['sdpa_rel']:.2e} | {c['kv_nan'] or c['q_nan']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/h200"))
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="interleaved timing rounds, the samples of each speedup's interval")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (an interval needs two), got {args.rounds}")
    if not torch.cuda.is_available():
        print("bench_layers needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)
    layers = moa_like_rules()
    prov = provenance()
    meta = {k: prov[k] for k in ("card", "date", "commit", "torch")}
    meta["triton"] = triton.__version__
    cost = cost_model(torch.device("cuda"))
    log(f"cost model: {cost}")
    result = {"meta": meta, "cost_model": dataclasses.asdict(cost), "rounds": args.rounds,
              "correctness": check(layers, min(args.lengths)), "lengths": []}
    log("correctness: " + ", ".join(f"{c['kv_rel']:.1e}/{c['q_rel']:.1e}"
                                   for c in result["correctness"]))
    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.lengths:
        result["lengths"].append(time_length(layers, n, args.rounds, log))
        atomic_write_text(args.out / "layers.json", json.dumps(result, indent=1))
        atomic_write_text(args.out / "layers.md", markdown(result))
        torch.cuda.empty_cache()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
