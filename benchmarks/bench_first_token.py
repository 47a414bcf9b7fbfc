"""Time to first token of a Llama-3-8B shape under three plans, against DynamicCache + SDPA.

A random bf16 32-layer Llama-3-8B shape (bench_decode's), batch 1, prompts of 32K and 128K
tokens, prefilled into a fresh cache with ``logits_to_keep=1``; each side as the model runs and
with its decoder layers compiled (the faster counts).  The plans:

- ``mixed``: bench_decode's mixed plan (spans N/32 .. N/2 and three full KV heads per layer),
  whose density is the same at every length;
- ``moa_kv`` / ``moa_q``: bench_layers' MoA-like plan (spans ``alpha + beta * N``, so the
  density falls with N; its 8 layers repeated), by KV head (each GQA group's widest span) and
  with the query heads' own spans, which the prefill honours while the cache keeps the widest.

Beside each measurement its bound: the dense time less the attention work the plan skips, at
SDPA's speed (32 layers x one layer's SDPA time x (1 - attention density)), with SDPA timed
alone and as it runs inside the dense model (CUDA events around its SDPA calls).

    python benchmarks/bench_first_token.py --out DIR [--layers 32] [--long-rounds 1]

With ``--paired-rounds R`` it times only the 128K prompt, dense and the plans of ``--paired``
taking turns in each of R rounds (first_token_paired.md): the main run's sides run one after
another, so its intervals leave out the card's drift between them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import (  # noqa: E402
    DEVICE,
    LONG,
    first_token_times,
    mixed_rules,
    prefill_once,
    random_llama,
)
from bench_layers import moa_like_rules, per_kv_head  # noqa: E402
from e2e_setups import (  # noqa: E402
    FIRST_TOKEN_PLANS,
    fastest_first_token,
    fastest_first_token_run,
)
from provenance import provenance  # noqa: E402
from timing import ROUNDS, Speedup, bench  # noqa: E402

from moaplan.errors import ModelError
from moaplan.io import atomic_write_text
from moaplan.plan import ModelShape, Plan
from moaplan.runtime import apply, remove
from moaplan.runtime.cache import MoaplanCache, cache_keyword
from moaplan.runtime.compiled import compiled_layers
from moaplan.runtime.gpu_time import interleaved_times
from moaplan.runtime.routing import dense_attention

CONTEXT = 32768


def plans(shape: ModelShape, layers: int) -> dict[str, Plan]:
    moa = moa_like_rules()
    return {"mixed": Plan(shape, [mixed_rules(i) for i in range(layers)]),
            "moa_kv": Plan(shape, [per_kv_head(moa[i % len(moa)]) for i in range(layers)]),
            "moa_q": Plan(shape, [moa[i % len(moa)] for i in range(layers)])}


def sdpa_layer_seconds(config, n: int) -> float:
    """One layer's causal SDPA (``enable_gqa``) on ``n`` tokens: the median of
    :func:`timing.bench`."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    q, k, v = (torch.randn(1, h, n, dim, device=DEVICE, dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    return bench(lambda: dense_attention(q, k, v, scale=None, gqa_native=True)) * 1e-3


def sdpa_in_model_seconds(model, n: int) -> float:
    """One layer's SDPA inside a dense eager prefill of ``n`` tokens into a DynamicCache: CUDA
    events around each of the model's calls of transformers' own SDPA attention, summed over
    the calls and divided by the layers (the caller has run the model at ``n`` before).  The
    torch profiler's device time of ``aten::scaled_dot_product_attention`` is not used: on
    the H200 it read 340 ms a layer at 128K, more than the whole eager dense prefill allows
    (11.9 s over 32 layers)."""
    from transformers import DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from moaplan.dispatch import attention_switched

    calls: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed_sdpa(module, *args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = sdpa_attention_forward(module, *args, **kwargs)
        end.record()
        calls.append((start, end))
        return out

    ids = torch.randint(0, 1000, (1, n), device=DEVICE)
    with torch.inference_mode(), attention_switched(model, timed_sdpa, mask=sdpa_mask):
        model(ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): DynamicCache()})
        torch.cuda.synchronize()
    milliseconds = sum(start.elapsed_time(end) for start, end in calls)
    return milliseconds * 1e-3 / model.config.num_hidden_layers


def cache_maker(plan: Plan | None):
    """A maker of a fresh cache for (batch, context): transformers' DynamicCache for the dense
    side, else the plan's MoaplanCache with room past the context."""
    from transformers import DynamicCache

    if plan is None:
        return lambda batch, context: DynamicCache()
    return lambda batch, context: MoaplanCache(plan, batch, context + 64, torch.bfloat16, DEVICE)


def measure(layers: int, long_rounds: int, save) -> dict:
    model = random_llama(layers)
    every = plans(ModelShape.from_config(model.config), layers)
    lengths = [CONTEXT, LONG]
    result = {"layers": layers, "lengths": lengths, "rounds": {str(CONTEXT): ROUNDS,
                                                               str(LONG): long_rounds},
              "ttft_s": {}, "ttft_compiled_s": {}, "runs_s": {},
              "sdpa_layer_s": {str(n): sdpa_layer_seconds(model.config, n) for n in lengths},
              "plans": {}}
    for name, plan in every.items():
        d = plan.densities(lengths)
        result["plans"][name] = {kind: dict(zip(map(str, lengths), d[kind].mean((0, 1))
                                                .tolist())) for kind in ("kv", "attention")}
    for side in ("dense", *every):
        plan = every.get(side)
        if plan is not None:
            apply(model, plan, strict=False)
        ttft, compiled, runs = first_token_times(model, cache_maker(plan), CONTEXT,
                                                 long_rounds=long_rounds)
        result["ttft_s"][side], result["ttft_compiled_s"][side] = ttft, compiled
        result["runs_s"][side] = runs
        if plan is None:
            result["sdpa_in_model_s"] = {str(n): sdpa_in_model_seconds(model, n)
                                         for n in lengths}
        else:
            remove(model)
        print(f"{side}: {ttft}; compiled {compiled}", flush=True)
        save(result)
    return result


def measure_paired(layers: int, rounds: int, names: list[str], save) -> dict:
    """Time to first token of one ``LONG``-token prompt, decoder layers compiled, dense and the
    plans ``names`` taking turns in each of ``rounds`` rounds (every other round reversed,
    ``gpu_time.interleaved_times``) after a round that compiles each side.  :func:`measure`
    runs one side after another, so a drift of the card between sides lies outside its
    intervals; here the speedup's interval pairs the sides within each round."""
    model = random_llama(layers)
    every = plans(ModelShape.from_config(model.config), layers)
    sides: dict[str, Plan | None] = {"dense": None, **{name: every[name] for name in names}}
    ids = torch.randint(0, 1000, (1, LONG), device=DEVICE)

    def prefill(side: str) -> float:
        plan = sides[side]
        if plan is None:
            with contextlib.suppress(ModelError):  # none applied yet
                remove(model)
        else:
            apply(model, plan, strict=False)
        return prefill_once(model, cache_maker(plan), ids, None)

    result = {"layers": layers, "n": LONG, "rounds": rounds,
              "sdpa_layer_s": sdpa_layer_seconds(model.config, LONG),
              "attention_density": {name: float(every[name].densities([LONG])["attention"]
                                                .mean()) for name in names}}
    with compiled_layers(model):
        for side in sides:  # compiles each side's layers
            prefill(side)
        runs = {side: functools.partial(prefill, side) for side in sides}
        result["runs_s"] = interleaved_times(runs, lambda run: run(), rounds)
    with contextlib.suppress(ModelError):
        remove(model)
    result["sdpa_in_model_s"] = sdpa_in_model_seconds(model, LONG)
    save(result)
    return result


def paired_rows(result: dict) -> list[dict]:
    """Per plan of a :func:`measure_paired` result: the median times, the paired speedup and
    the bounds (:func:`_bound`)."""
    dense = result["runs_s"]["dense"]
    out = []
    for name, density in result["attention_density"].items():
        ours = result["runs_s"][name]
        skipped = result["layers"] * (1 - density)
        out.append({"plan": name, "attention_density": density,
                    "dense_s": statistics.median(dense), "ours_s": statistics.median(ours),
                    "speedup": dataclasses.asdict(Speedup.paired(dense, ours)),
                    "bound_speedup": _bound(statistics.median(dense),
                                            skipped * result["sdpa_layer_s"]),
                    "bound_in_model_speedup": _bound(statistics.median(dense),
                                                     skipped * result["sdpa_in_model_s"])})
    return out


def paired_markdown(report: dict) -> str:
    lines = [f"# Time to first token, sides in turns: {report['card']}", "",
             f"{report['date']}, commit `{report['commit']}`, torch {report['torch']}, triton "
             f"{report['triton']}.  A random bf16 {report['layers']}-layer Llama-3-8B shape, "
             f"one {report['n'] // 1024}K-token prompt, decoder layers compiled; dense "
             "(DynamicCache + SDPA, cuDNN) and each plan take turns in each of "
             f"{report['rounds']} rounds (every other round reversed), after a round that "
             "compiles each.  Speedup: the geometric mean over rounds of dense's time over the "
             "plan's in the same round, with its 95% t-interval.  Bounds as in first_token.md: one "
             f"layer's SDPA {report['sdpa_layer_s'] * 1e3:.1f} ms timed alone, "
             f"{report['sdpa_in_model_s'] * 1e3:.1f} ms in the model (CUDA events around "
             "its SDPA calls, eager).", "",
             "| plan | attention density | dense s | plan s | speedup | 95% interval "
             "| bound | bound in-model |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        speedup = Speedup(**row["speedup"])
        lines.append(f"| {FIRST_TOKEN_PLANS[row['plan']]} | {row['attention_density']:.3f} | "
                     f"{row['dense_s']:.3f} | {row['ours_s']:.3f} | {speedup.mean:.3f}x | "
                     f"{_interval(row['speedup'])} | {row['bound_speedup']:.3f}x | "
                     f"{row['bound_in_model_speedup']:.3f}x |")
    return "\n".join(lines) + "\n"


def rows(result: dict) -> list[dict]:
    """Per plan and length: the faster time of each side, the speedup and its bound."""
    out = []
    in_model = result.get("sdpa_in_model_s")  # results from before it lack it
    for name, densities in result["plans"].items():
        for n in map(str, result["lengths"]):
            dense, ours = (fastest_first_token(result, side, n) for side in ("dense", name))
            if dense is None or ours is None:
                continue
            skipped = result["layers"] * (1 - densities["attention"][n])  # layers of SDPA
            runs = [_fastest_runs(result, side, n) for side in ("dense", name)]
            interval = (dataclasses.asdict(Speedup.unpaired(*runs))
                        if all(len(r) > 1 for r in runs) else None)
            out.append({"plan": name, "n": int(n), "kv_density": densities["kv"][n],
                        "attention_density": densities["attention"][n], "dense_s": dense,
                        "ours_s": ours, "speedup": dense / ours, "speedup_ci": interval,
                        "bound_speedup": _bound(dense, skipped * result["sdpa_layer_s"][n]),
                        "bound_in_model_speedup": in_model and _bound(dense,
                                                                      skipped * in_model[n])})
    return out


def _bound(dense_s: float, skipped_s: float) -> float:
    """The speedup if the plan's attention ran at SDPA's speed: the dense time less the
    attention the plan skips (``skipped_s`` of SDPA)."""
    return dense_s / (dense_s - skipped_s)


def _fastest_runs(result: dict, side: str, n: str) -> list[float]:
    """The timed runs behind ``side``'s faster time at ``n`` (none where they were not kept:
    results from before they were)."""
    run = fastest_first_token_run(result, side, n)
    times = result.get("runs_s", {}).get(side, {}).get(run, {}).get(n)
    return times if isinstance(times, list) else []


def _interval(record: dict | None) -> str:
    if record is None:
        return "-"
    speedup = Speedup(**record)
    return f"[{speedup.low:.3f}, {speedup.high:.3f}]"


def _layer_times(sdpa_s: dict | None) -> str:
    """One layer's SDPA time at each length, or that it was not measured."""
    if not sdpa_s:
        return "not measured in this run"
    return ", ".join(f"{int(n) // 1024}K {s * 1e3:.1f} ms" for n, s in sdpa_s.items())


def _ratio(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.3f}x"


def _seconds(run: dict, n: int) -> str:
    """One run's seconds at ``n``, or its error (compiling)."""
    value = run.get(str(n), run.get("error"))
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = [f"# Time to first token: {report['card']}", "",
             f"{report['date']}, commit `{report['commit']}`, torch {report['torch']}, triton "
             f"{report['triton']}.  A random bf16 {report['layers']}-layer Llama-3-8B shape, "
             "batch 1; each side's faster of the model as it runs and with its decoder layers "
             "compiled.  Dense: DynamicCache + SDPA (cuDNN).  95% interval: Welch's t-interval "
             "of the speedup (on log times) from each side's timed runs, where both have two "
             "or more (the shorter prompt's always, the longer one's with --long-rounds 2 or "
             "more).  Bound: the speedup if "
             "the plan's attention ran at SDPA's speed (dense time less layers x one layer's "
             "SDPA time x (1 - attention density)), with SDPA timed alone, outside the model ("
             + _layer_times(report["sdpa_layer_s"]) + "), and in-model: CUDA events around "
             "the SDPA calls of an eager dense prefill, over the layers ("
             + _layer_times(report.get("sdpa_in_model_s")) + ").", "",
             "| plan | context | KV density | attention density | dense s | plan s | speedup "
             "| 95% interval | bound | bound in-model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report.get("rows", []):
        lines.append(f"| {FIRST_TOKEN_PLANS[row['plan']]} | {row['n'] // 1024}K | "
                     f"{row['kv_density']:.3f} | {row['attention_density']:.3f} | "
                     f"{row['dense_s']:.3f} | {row['ours_s']:.3f} | {row['speedup']:.3f}x | "
                     f"{_interval(row.get('speedup_ci'))} | {row['bound_speedup']:.3f}x | "
                     f"{_ratio(row.get('bound_in_model_speedup'))} |")
    rounds = ", ".join(f"{int(n) // 1024}K {r}" for n, r in report.get("rounds", {}).items())
    lines += ["", "Every side (s), as the model runs / compiled, each the median of its timed "
              f"runs after a warm-up{f' (runs: {rounds})' if rounds else ''}:", "",
              "| side | " + " | ".join(f"{n // 1024}K" for n in report["lengths"]) + " |",
              "|---" * (1 + len(report["lengths"])) + "|"]
    for side, ttft in report["ttft_s"].items():
        compiled = report["ttft_compiled_s"].get(side, {})
        cells = [f"{_seconds(ttft, n)} / {_seconds(compiled, n)}" for n in report["lengths"]]
        lines.append(f"| {FIRST_TOKEN_PLANS.get(side, side)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--long-rounds", type=int, default=1,
                        help="timed runs of each 128K prefill (~10 s each), after a warm-up")
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="instead: rounds of the 128K prompt in which dense and the "
                             "--paired plans take turns (first_token_paired.md)")
    parser.add_argument("--paired", nargs="+", choices=list(FIRST_TOKEN_PLANS),
                        default=["moa_q"], help="the plans of --paired-rounds")
    args = parser.parse_args(argv)
    if args.long_rounds < 1:
        parser.error(f"--long-rounds must be at least 1, got {args.long_rounds}")
    if args.paired_rounds == 1 or args.paired_rounds < 0:
        parser.error(f"--paired-rounds must be 0 (off) or at least 2, got {args.paired_rounds}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    import transformers

    report = dict(provenance(), torch=torch.__version__, triton=triton.__version__,
                  transformers=transformers.__version__)

    stem, table, write = (("first_token_paired", paired_rows, paired_markdown)
                           if args.paired_rounds else ("first_token", rows, markdown))

    def save(result: dict) -> None:
        report.update(result, rows=table(result))
        atomic_write_text(args.out / f"{stem}.json", json.dumps(report, indent=1))
        atomic_write_text(args.out / f"{stem}.md", write(report))

    start = time.monotonic()
    if args.paired_rounds:
        measure_paired(args.layers, args.paired_rounds, args.paired, save)
    else:
        measure(args.layers, args.long_rounds, save)
    print(write(report), f"done in {time.monotonic() - start:.0f} s", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
