"""GPU benchmark of the profiler (H100, bf16): correctness, then cost against a plain fwd + bwd.

1. Kernel check: the Triton influence summary (bf16) and the torch path (fp32) against the naive
   full-matrix E in float64, with GQA and a length that is not a multiple of the block; the
   fused attention's dq/dk/dv against SDPA's autograd.
2. Model check: a 2-layer model profiled with the triton and torch backends gives the same
   summaries.
3. Kernel timing: influence_summary alone vs SDPA forward + backward of one layer
   (``--sweep``: launch variants too).
4. Llama-3-8B shape (random bf16 weights, vocab 32000), one sample at 16K and 32K with gradient
   checkpointing: time and peak memory of profiling vs a plain forward + backward of the same
   loss (frozen weights, grad to the input embeddings), SDPA default backend (``--flash-baseline``:
   also SDPA's FlashAttention-2 backend).

Usage: ``python benchmarks/bench_profiler.py --out DIR [--layers 32] [--lengths 16384 32768]
[--sweep] [--flash-baseline] [--skip-model-check]``; writes ``DIR/profiler.json`` and
``DIR/profiler.md`` and prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton.testing
from transformers import LlamaConfig, LlamaForCausalLM

from moaplan.kernels.influence import influence_summary
from moaplan.profile import profile_model
from moaplan.profile.attention import InfluenceCollector, _ProfiledAttention
from moaplan.profile.influence import (
    EPS,
    BlockSummary,
    attention_backward,
    attention_forward,
    naive_influence,
    summarize_dense,
)
from moaplan.profile.profiler import _profiling_mode, response_loss
from moaplan.rules import RuleSpace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402
from timing import wall_seconds  # noqa: E402


@dataclass
class Sample:
    input_ids: torch.Tensor
    response_mask: torch.Tensor


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def kernel_check(dev: str) -> dict:
    torch.manual_seed(1)
    b, hq, hkv, n, d, blk, k_sink = 2, 8, 2, 1000, 128, 64, 2
    q, do = (torch.randn(b, hq, n, d, device=dev) for _ in range(2))
    k, v = (torch.randn(b, hkv, n, d, device=dev) for _ in range(2))
    scale = d ** -0.5
    q16, k16, v16, do16 = (t.bfloat16() for t in (q, k, v, do))
    # summaries are per query head
    ref = summarize_dense(naive_influence(q16, k16, v16, do16, scale), blk, k_sink, hq)
    o, lse = attention_forward(q16.float(), k16.float(), v16.float(), scale, blk)
    tri = BlockSummary.zeros(hq, n, blk, k_sink, dev)
    influence_summary(q16, k16, v16, do16, lse, (do16.float() * o).sum(-1), scale, blk,
                      tri.far, tri.sink, eps=EPS)
    tor = BlockSummary.zeros(hq, n, blk, k_sink, dev)
    attention_backward(q16.float(), k16.float(), v16.float(), o, lse, do16.float(), scale, tor, blk)
    # The fused autograd function (flash fwd/bwd + Triton summary) vs SDPA autograd, bf16.
    coll = InfluenceCollector(block=blk, num_sink_blocks=k_sink, backend="triton")
    leaves = [t.clone().requires_grad_() for t in (q16, k16, v16)]
    out = _ProfiledAttention.apply(*leaves, scale, coll, 0, True)
    out.backward(do16)
    sdpa = [t.clone().requires_grad_() for t in (q16, k16, v16)]
    torch.nn.functional.scaled_dot_product_attention(*sdpa, is_causal=True,
                                                     enable_gqa=True).backward(do16)
    return {
        "triton_bf16_far_rel": rel(tri.far, ref.far),
        "triton_bf16_sink_rel": rel(tri.sink, ref.sink),
        "torch_fp32_far_rel": rel(tor.far, ref.far),
        "torch_fp32_sink_rel": rel(tor.sink, ref.sink),
        "fused_far_rel": rel(coll.summaries[0].far, ref.far),
        "fused_grad_rel": max(rel(a.grad, s.grad) for a, s in zip(leaves, sdpa, strict=True)),
    }


def llama_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=32768, rope_theta=500000.0)


def make_model(layers: int):
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16, on the GPU: fast and small
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(llama_config(layers))
    finally:
        torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    return model.to(torch.bfloat16).eval()


def make_sample(n: int) -> Sample:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n // 2:] = True
    return Sample(torch.randint(0, 32000, (n,)), mask)


def model_check() -> dict:
    model = make_model(2)
    samples = {1024: [make_sample(1024)]}
    space = RuleSpace(sinks=(64, 128))
    a = profile_model(model, samples, rule_space=space, backend="triton")
    b = profile_model(model.float(), samples, rule_space=space, backend="torch")
    return {"model_far_rel_triton_vs_torch": rel(torch.from_numpy(a.far(1024)),
                                                 torch.from_numpy(b.far(1024)))}


# Launch variants next to the default (row_blocks, warps, stages) = (4, 8, 2).
CONFIGS = [(1, 4, 2), (2, 8, 2), (4, 8, 3), (8, 8, 2)]


def kernel_timing(n: int, sweep_configs: bool) -> dict:
    torch.manual_seed(2)
    q, do = (torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(1, 32, n, device="cuda").abs() + 5
    delta = torch.randn(1, 32, n, device="cuda")
    s = BlockSummary.zeros(32, n, 64, 1, "cuda")
    flops = 2 * 2 * 32 * 128 * n * n / 2  # two causal matmuls
    sweep = {}
    for rb, warps, stages in CONFIGS if sweep_configs else []:
        ms = triton.testing.do_bench(
            lambda rb=rb, warps=warps, stages=stages: influence_summary(
                q, k, v, do, lse, delta, 128 ** -0.5, 64, s.far, s.sink, row_blocks=rb,
                num_warps=warps, num_stages=stages),
            warmup=50, rep=300, return_mode="median")
        sweep[f"rb{rb}/w{warps}/s{stages}"] = ms
    default = triton.testing.do_bench(
        lambda: influence_summary(q, k, v, do, lse, delta, 128 ** -0.5, 64, s.far, s.sink),
        warmup=50, rep=300, return_mode="median")
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))

    def fwd_bwd() -> None:
        torch.nn.functional.scaled_dot_product_attention(
            qq, kk, vv, is_causal=True, enable_gqa=True).backward(do)

    sdpa = triton.testing.do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")
    return {"n": n, "influence_ms": default, "sdpa_fwd_bwd_ms": sdpa,
            "influence_tflops": flops / default / 1e9, "sweep_ms": sweep}


def timed(fn, reps: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn`` after one warm-up run."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = [wall_seconds(fn) for _ in range(reps)]
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2 ** 30


def model_timing(model, n: int, reps: int, flash_baseline: bool) -> dict:
    sample = make_sample(n)
    samples = {n: [sample]}

    def plain() -> None:
        loss, embeds = response_loss(model, sample)
        torch.autograd.grad(loss, embeds)

    def plain_with(ctx):
        def run() -> None:
            with _profiling_mode(model, True), ctx():
                plain()
        return run

    from torch.nn.attention import SDPBackend, sdpa_kernel

    base_s, base_gib = timed(plain_with(contextlib.nullcontext), reps)
    prof_s, prof_gib = timed(lambda: profile_model(model, samples, backend="triton",
                                                   gradient_checkpointing=True), reps)
    out = {"n": n, "plain_s": base_s, "plain_peak_gib": base_gib, "profile_s": prof_s,
           "profile_peak_gib": prof_gib, "ratio": prof_s / base_s}
    if flash_baseline:
        flash_s, _ = timed(plain_with(lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)), reps)
        out |= {"plain_flash_s": flash_s, "ratio_vs_flash": prof_s / flash_s}
    return out


def reference_ranking(lengths: list[int], samples: int) -> dict:
    """Does the profile rank the reference model's far-looking heads as the costliest to
    restrict?  Cost: dropped influence of ``sink 64 + window 1024`` per (layer, KV head);
    head map: share of attention mass at distance >= 1024 (answer queries of passkey prompts,
    :func:`moaplan.eval.headmap.far_attention_share`).  Runs on the CPU."""
    from scipy.stats import spearmanr

    from moaplan.data import model_calibration
    from moaplan.eval.headmap import far_attention_share
    from moaplan.model import load_model
    from moaplan.rules import Rule

    model, tokenizer = load_model()
    data = {n: model_calibration(model, tokenizer, n, samples, seed=0) for n in lengths}
    profile = profile_model(model, data)
    head_map = far_attention_share(model, tokenizer, length=4096, far=1024)
    out = {"lengths": lengths, "samples": samples}
    for n in lengths:
        cost = profile.dropped_influence([Rule.window(1024, sink=64)], n)[:, 0]
        share = head_map.answer.reshape(-1)
        k = max(1, len(cost) // 8)
        top_cost, top_share = set(np.argsort(-cost)[:k]), set(np.argsort(-share)[:k])
        out[n] = {"spearman": float(spearmanr(cost, share).statistic),
                  f"top{k}_overlap": len(top_cost & top_share) / k,
                  "top_heads_by_cost": sorted(int(h) for h in top_cost),
                  "top_heads_by_far_share": sorted(int(h) for h in top_share),
                  "cost": cost.round(6).tolist(), "far_share": share.round(4).tolist()}
    return out


def stage(results: dict, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # keep the other stages' numbers when one fails
        results[name] = {"error": f"{type(err).__name__}: {err}"}
        traceback.print_exc()
    print(f"[{time.perf_counter() - start:6.1f}s] {name}: {results[name]}", flush=True)


def markdown(res: dict) -> str:
    lines = [f"# Profiler benchmark ({res['device']}, bf16)", "",
             f"date {res['date']}, commit {res.get('commit', 'not recorded')}, torch "
             f"{res['torch']}, layers {res['layers']}", "",
             "| N | plain fwd+bwd (s) | profile (s) | ratio | peak plain (GiB) | "
             "peak profile (GiB) | plain, SDPA flash backend (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in res.get("model", []):
        if "error" in r:
            lines.append(f"| {r.get('n')} | error: {r['error']} |")
            continue
        flash = f"{r['plain_flash_s']:.2f}" if "plain_flash_s" in r else "-"
        lines.append(f"| {r['n']} | {r['plain_s']:.2f} | {r['profile_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['plain_peak_gib']:.1f} | "
                     f"{r['profile_peak_gib']:.1f} | {flash} |")
    lines += ["", "| N | influence kernel (ms) | TFLOP/s | SDPA fwd+bwd one layer (ms) |",
              "|---|---|---|---|"]
    for r in res.get("kernel_timing", []):
        if "error" not in r:
            lines.append(f"| {r['n']} | {r['influence_ms']:.2f} | {r['influence_tflops']:.0f} | "
                         f"{r['sdpa_fwd_bwd_ms']:.2f} |")
    lines += ["", "Correctness: " + json.dumps(res.get("kernel_check")),
              "Model check: " + json.dumps(res.get("model_check"))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/h100")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="time kernel launch variants")
    parser.add_argument("--flash-baseline", action="store_true",
                        help="also time the plain run with SDPA's FlashAttention-2 backend")
    parser.add_argument("--skip-model-check", action="store_true")
    parser.add_argument("--reference", type=int, nargs="*", metavar="LENGTH",
                        help="only compare the reference model's profile at these lengths with "
                             "its head map (CPU is fine), e.g. --reference 2048 4096")
    args = parser.parse_args()
    if args.reference:
        res = {"reference": {}}
        stage(res, "reference", lambda: reference_ranking(args.reference, 2))
        print(json.dumps(res["reference"], indent=1))
        return
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d"), "commit": provenance()["commit"],
                 "layers": args.layers}
    stage(res, "kernel_check", lambda: kernel_check("cuda"))
    if not args.skip_model_check:
        stage(res, "model_check", model_check)
    res["kernel_timing"] = []
    for n in args.lengths:
        sweep = args.sweep and n == max(args.lengths)
        stage(res, f"kernel_{n}", lambda n=n, sweep=sweep: kernel_timing(n, sweep))
        res["kernel_timing"].append(res.pop(f"kernel_{n}"))
    model = make_model(args.layers)
    res["model"] = []
    for n in args.lengths:
        stage(res, f"model_{n}", lambda n=n: model_timing(model, n, args.reps, args.flash_baseline))
        res["model"].append({"n": n, **res.pop(f"model_{n}")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profiler.json").write_text(json.dumps(res, indent=1))
    (out / "profiler.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
