"""The markdown summary of the results under a results root: quality, speed, optimizer.

One text serves ``SUMMARY.md`` (beside the machine folders) and the README's benchmark
section; only the heading level and the base of the image links differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from e2e_setups import FIRST_TOKEN_PLANS, SETUPS, best_rate, fastest_first_token
from quality_report import describe, quality_table, validation_agreement, verdicts


def _find(root: Path, name: str, machine: str) -> Path | None:
    """``root/<machine>/<name>``, else the first other machine folder that has it."""
    own = root / machine / name
    if own.exists():
        return own
    return next(iter(sorted(root.glob(f"*/{name}"))), None)


def _every(root: Path, name: str, machine: str) -> list[Path]:
    """``root/*/<name>`` of every machine folder, ``machine``'s first."""
    return sorted(root.glob(f"*/{name}"), key=lambda p: (p.parent.name != machine, p))


def _short(commit: str) -> str:
    """A 12-digit hash, keeping any suffix such as ``+uncommitted``."""
    head, plus, rest = commit.partition("+")
    return head[:12] + plus + rest


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _image(png: Path, base: Path, alt: str) -> str:
    return f"![{alt}]({_link(png, base)})" if png.exists() else ""


def _quality(path: Path, base: Path, h: str) -> list[str]:
    report = _load(path)
    images = [_image(path.with_name(f"{path.stem}_{n}.png"), base, n)
              for n in ("accuracy", "passkey", "kv")]
    own = " calibrated in its own wording" if report["meta"]["settings"].get("own_wording") else ""
    return [f"{h}# Test bed `{report['meta']['testbed']['name']}`{own}", describe(report),
            quality_table(report), "Paired comparisons (searched minus the other; a verdict "
            "only where McNemar's p < 0.05):", "\n".join(verdicts(report)),
            "\n".join(validation_agreement(report)), "\n".join(filter(None, images))]


def _query_spans(path: Path, base: Path) -> list[str]:
    """A test bed's per-query-head spans: the search's choice against the common cap and
    against the un-narrowed KV plan (paired, ``bench_query_spans.py``)."""
    report = _load(path)
    meta = report["meta"]
    plans = {row["plan"]: row for row in report["plans"]}
    details = _link(path.with_suffix(".md"), base)
    rows = ["| plan | attention density (longest) | KL to dense [95% CI] |", "|---|---|---|"]
    for name in ("optimizer, KV only", "optimizer", "optimizer, query heads capped",
                 "streaming, query heads capped"):
        row = plans[name]
        rows.append(f"| {name} | {list(row['attention_density'].values())[-1]:.3f} | "
                    f"{row['kl_95']} |")
    pairs = [f"{c['plan']} vs {c['against']}: {c['difference']} ({c['verdict']})"
             for c in report["comparisons"] if c["plan"] == "optimizer"
             and c["against"] in ("optimizer, query heads capped", "optimizer, KV only")]
    where = meta.get("card") or f"{meta.get('cpu')}, {meta.get('cores')} cores"
    return [f"Per-query-head spans on {meta['testbed']} (`benchmarks/bench_query_spans.py`, "
            f"{where}, {meta['date']}, commit `{_short(meta['commit'])}`): KV budget "
            f"{meta['kv_budget']}, attention budget {meta['attention_budget']}, "
            f"{meta['test_samples']} fresh held-out samples, paired; " + "; ".join(pairs)
            + f". Details: [{details}]({details}).", "\n".join(rows)]


def _prefill(path: Path, base: Path) -> list[str]:
    report = _load(path)
    meta = report["meta"]
    rows = [r for r in report["rows"] if r["plan"] == "mixed"]
    # Where the run also replayed CUDA graphs, each side takes the faster of its two timings:
    # a 4K layer called from Python measures the host's launch cost as much as the kernel,
    # and SDPA's graph replay at 32K read 3-5% slower than its calls (NOTES_prefill run 8).
    graphs = all("graph" in r for r in rows)
    timed = ("the faster of Python calls and CUDA-graph replays for each side (a graph replay "
             "is the GPU's time alone, as in a model whose host runs ahead)"
             if graphs else "Python calls")
    lines = [f"Prefill attention (`benchmarks/bench_prefill.py`), the mixed plan (per-head spans "
             f"N/32 .. full, 64 sinks); B=1, 32 query / 8 KV heads, D=128, bf16; "
             f"{meta['card']}, {meta['date']}, commit `{_short(meta['commit'])}`; times from "
             f"{timed}.  vs SDPA: "
             "dense causal SDPA, default backend (cuDNN), keys repeated per query head "
             "beforehand; vs Flex: compiled FlexAttention with the same mask; eta = ideal / "
             "moaplan (ideal = density x SDPA).",
             "",
             "| N | attention density | moaplan ms | FlexAttention ms | SDPA dense ms | ideal ms "
             "| vs SDPA | vs Flex | eta |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ours, flex, sdpa = (min(r["ms"][key], r["graph"]["ms"][key]) if graphs else r["ms"][key]
                            for key in ("ours", "flex", "sdpa_default_dense"))
        ideal = r["density"] * sdpa
        lines.append(f"| {r['n']} | {r['density']:.3f} | {ours:.3f} | {flex:.3f} "
                     f"| {sdpa:.3f} | {ideal:.3f} | {sdpa / ours:.2f}x | {flex / ours:.2f}x "
                     f"| {ideal / ours:.2f} |")
    return ["\n".join(lines), _image(path.with_name("prefill_speedup.png"), base, "prefill")]


def _interval(speedup: dict | None) -> str:
    """A speedup's 95% interval where the report has one (a ``timing.Speedup`` record)."""
    if not speedup or "low" not in speedup:
        return ""
    return f" [{speedup['low']:.3f}, {speedup['high']:.3f}]"


def _layers(path: Path, base: Path) -> list[str]:
    report = _load(path)
    meta = report["meta"]
    details = _link(path.with_suffix(".md"), base)
    beside = all("dense_total_ms" in r for r in report["lengths"])
    when = "timed beside each layer" if beside else "timed once per length"
    lines = [f"Prefill layer by layer (`benchmarks/bench_layers.py`): a MoA-like plan of 8 layers "
             f"(attention densities 0.5-1.0 per layer), each layer routed between SDPA and the "
             f"block-sparse kernel (`moaplan.runtime.routing`); B=1, 32 query / 8 KV heads, "
             f"D=128, bf16, CUDA-graph replays; {meta['card']}, {meta['date']}, commit "
             f"`{_short(meta['commit'])}`.  Against dense: SDPA (cuDNN), the faster of "
             f"enable_gqa and keys repeated beforehand (the repeat not timed), "
             f"{when}.  Per-KV-head rules: the "
             f"widest span of each group of 4 (what the cache keeps); per-query-head: MoA's own "
             f"spans in the prefill.  Details: [{details}]({details}).",
             "",
             "| N | dense ms (8 layers) | per-KV-head rules ms | vs dense | ideal | "
             "per-query-head spans ms | vs dense | ideal | slowest windowed layer vs dense "
             "[95% interval] |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["lengths"]:
        # A layer on the dense route makes the baseline's own call: not a windowed layer.
        slow = min(({"mean": x["speedup"][name], **x.get("speedup_ci", {}).get(name, {})}
                    for x in r["layers"] for name in ("kv", "q")
                    if x.get("route", {}).get(name) != "dense"), key=lambda s: s["mean"])
        # Older results timed one dense baseline per length, not one beside each layer.
        dense = r.get("dense_total_ms") or len(r["layers"]) * r["dense_ms"]
        lines.append(f"| {r['n']} | {dense:.2f} | {r['total_ms']['kv']:.2f} "
                     f"| {r['speedup']['kv']:.2f}x | {r['ideal_speedup']['kv']:.2f}x "
                     f"| {r['total_ms']['q']:.2f} | {r['speedup']['q']:.2f}x "
                     f"| {r['ideal_speedup']['q']:.2f}x | {slow['mean']:.3f}x{_interval(slow)} |")
    return ["\n".join(lines)]


def _decode(path: Path, base: Path) -> list[str]:
    report = _load(path)
    # Older results lack the graph and stack timings.
    stacks = [k["stack"] for k in report["kernel"] if "stack" in k]
    stack_note = "" if not stacks else (
        f"  In a stack: one CUDA graph runs the call for {stacks[0]['layers']} layers, each "
        "over its own buffers, as a decode step does (per layer).")
    lines = [f"Decode attention (`benchmarks/bench_decode.py`), a mixed plan at KV density 0.5; "
             f"{report['card']}, {report['date']}, commit `{_short(report['commit'])}`; "
             f"speedup against SDPA (default backend) reading the dense cache.{stack_note}",
             "",
             "| batch | context | moaplan ms (default launch) | useful TB/s | best launch TB/s "
             "| GPU-only TB/s (graph) | GPU per layer in a stack TB/s | SDPA dense cache ms "
             "| SDPA TB/s | speedup | speedup in a stack |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in report["kernel"]:
        default = k.get("default", k["best"])  # results from before defaults were recorded
        graph = f"{k['graph']['useful_tb_s']:.2f}" if "graph" in k else "-"
        stack = k.get("stack")
        in_stack = ("-", "-") if stack is None else (
            f"{stack['useful_tb_s']:.2f}", f"{stack['speedup_vs_sdpa']:.2f}x")
        lines.append(f"| {k['batch']} | {k['n']} | {default['ms']:.3f} "
                     f"| {default['useful_tb_s']:.2f} | {k['best']['useful_tb_s']:.2f} "
                     f"| {graph} | {in_stack[0]} | {k['sdpa_ms']:.3f} | {k['sdpa_tb_s']:.2f} "
                     f"| {k['sdpa_ms'] / default['ms']:.2f}x | {in_stack[1]} |")
    e2e = report.get("e2e")
    if e2e:
        dense, ours = e2e["dense"], e2e["moaplan"]
        lines += ["", f"End to end ({e2e['layers']}-layer Llama-3-8B shape, "
                      f"{e2e['n'] // 1024}K contexts): KV cache {ours['memory_vs_dense']:.2f}x "
                      f"of DynamicCache's; batch {ours['batch']}: {ours['tokens_per_s']:.0f} vs "
                      f"{dense['tokens_per_s']:.0f} tokens/s; largest batch "
                      f"{e2e['largest_batch']['moaplan']} vs {e2e['largest_batch']['dense']}: "
                      f"{ours['at_largest_batch']['tokens_per_s']:.0f} vs "
                      f"{dense['at_largest_batch']['tokens_per_s']:.0f} tokens/s"
                      + (f" (DynamicCache with SDPA {dense['sdpa_backend']}, the faster)."
                         if "sdpa_backend" in dense else ".")]
        if "graph_tokens_per_s" in ours:
            lines[-1] += (" Decoding from a replayed CUDA graph (`moaplan.greedy_generate`): "
                          f"{ours['graph_tokens_per_s']:.0f} tokens/s at batch {ours['batch']}, "
                          f"{ours['at_largest_batch']['graph_tokens_per_s']:.0f} at the largest.")
        if "prefill_s" in e2e:
            parts = [f"{name} {e2e['prefill_s']['moaplan'][name]:.2f} s vs {dense_s:.2f} s"
                     for name, dense_s in e2e["prefill_s"]["dense"].items()]
            lines[-1] += " Prefill (time to first token): " + "; ".join(parts) + "."
        if "gpu_tokens_per_s" in ours:
            lines[-1] += (" From the GPU's busy time alone (no host launch cost): "
                          f"{ours['gpu_tokens_per_s']:.0f} vs {dense['gpu_tokens_per_s']:.0f} "
                          f"at batch {ours['batch']}, "
                          f"{ours['at_largest_batch']['gpu_tokens_per_s']:.0f} vs "
                          f"{dense['at_largest_batch']['gpu_tokens_per_s']:.0f} at the largest.")
    return ["\n".join(lines), _image(path.with_name("decode_bandwidth.png"), base, "decode")]


def _decode_e2e(path: Path, base: Path) -> list[str]:
    report = _load(path)
    e2e = report["e2e"]
    link = _link(path.with_suffix(".md"), base)
    lines = [f"Decode end to end (`benchmarks/bench_decode.py --e2e-only`): a random "
             f"{e2e['layers']}-layer Llama-3-8B shape, bf16, {e2e['n'] // 1024}K-token contexts, "
             f"the mixed plan at KV density {e2e['plan_kv_density']:.2f}; {report['card']}, "
             f"{report['date']}, commit `{_short(report['commit'])}`.  Byte bound: (weights + "
             "the K/V bytes a step must read) / the card's measured copy bandwidth "
             f"({e2e['copy_bandwidth']['read_write_bytes_per_s'] / 1e12:.2f} TB/s).  The mixed "
             "plan's ratio against each dense setup, beside the ratio the bytes allow.  "
             "Graph setups: the faster of the step replayed from a CUDA graph as the model "
             "runs it and with its decoder layers compiled by `torch.compile` (both sides "
             "alike; `moaplan.greedy_generate(..., compile=True)`).  "
             f"Details: [{link}]({link}).",
             "",
             "| setup | batch | tokens/s | ms/step | byte bound ms | % of bound "
             "| mixed plan vs this (bytes allow) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for key, (_, label) in SETUPS.items():
        row = e2e.get(key)
        if row is None or "bound" not in row:
            continue
        rate = best_rate(row)
        vs = e2e["moaplan_vs"].get(key)
        ratio = f"{vs['measured']:.2f}x ({vs['bytes_allow']:.2f}x)" if vs else "-"
        bound = row["bound"]
        lines.append(f"| {label} | {row['batch']} | {rate:.0f} | {bound['ms_per_step']:.2f} "
                     f"| {bound['bound_ms']:.2f} | {bound['fraction_of_bound']:.0%} | {ratio} |")
    largest = e2e.get("largest_batch_vs_full")
    if largest:
        ours, full = e2e["moaplan"]["at_largest_batch"], e2e["moaplan_full"]["at_largest_batch"]
        lines += ["", f"At the largest batch each cache fits: the mixed plan at batch "
                  f"{ours['batch']} {best_rate(ours):.0f} tokens/s, the all-full "
                  f"plan at batch {full['batch']} {best_rate(full):.0f}: "
                  f"{largest['measured']:.2f}x (the bytes allow {largest['bytes_allow']:.2f}x)."]
    ttft = e2e.get("ttft_s")
    if ttft:
        fastest = {n: [fastest_first_token(e2e, side, n) for side in ("dense", "moaplan")]
                   for n in ttft["moaplan"]}
        parts = [f"{int(n) // 1024}K {dense_s:.2f} s vs {ours_s:.2f} s "
                 f"({dense_s / ours_s:.2f}x)" for n, (dense_s, ours_s) in fastest.items()]
        lines += ["", "Time to first token, batch 1, DynamicCache + SDPA vs the mixed plan (each "
                  "side's faster, as the model runs or with its decoder layers compiled): "
                  + "; ".join(parts) + "."]
    return ["\n".join(lines)]


def _first_token(path: Path, base: Path) -> list[str]:
    """Time to first token per plan and length, each beside the speedup its density allows."""
    report = _load(path)
    link = _link(path.with_suffix(".md"), base)
    plans: dict[str, list[str]] = {}
    for row in report["rows"]:
        plans.setdefault(row["plan"], []).append(
            f"{row['n'] // 1024}K {row['speedup']:.3f}x{_interval(row.get('speedup_ci'))} "
            f"(bound {row['bound_speedup']:.3f}x"
            + (f", {row['bound_in_model_speedup']:.3f}x in-model"
               if row.get("bound_in_model_speedup") else "")
            + f", attention density {row['attention_density']:.2f})")
    return [f"Time to first token (`benchmarks/bench_first_token.py`): a random "
            f"{report['layers']}-layer Llama-3-8B shape, batch 1, against DynamicCache + SDPA "
            f"(each side's faster, as the model runs or compiled); {report['card']}, "
            f"{report['date']}, commit `{_short(report['commit'])}`.  "
            + "; ".join(f"{FIRST_TOKEN_PLANS[name]}: {', '.join(parts)}"
                        for name, parts in plans.items())
            + f".  In brackets: the speedup's 95% interval over the timed runs, where there "
            f"were two or more a side.  The bound: the dense time less the attention the plan "
            f"skips, at SDPA's speed (SDPA timed alone; in-model: CUDA events around its calls "
            f"in the dense model).  Details: [{link}]({link})."]


def _first_token_paired(path: Path, base: Path) -> list[str]:
    """The long prompt's time to first token with dense and the plans taking turns."""
    report = _load(path)
    link = _link(path.with_suffix(".md"), base)
    parts = [f"{FIRST_TOKEN_PLANS[row['plan']]} {row['speedup']['mean']:.3f}x"
             f"{_interval(row['speedup'])} (bound {row['bound_speedup']:.3f}x, "
             f"{row['bound_in_model_speedup']:.3f}x in-model)" for row in report["rows"]]
    return [f"The same at {report['n'] // 1024}K with the sides taking turns in each of "
            f"{report['rounds']} rounds (compiled; {report['card']}, {report['date']}, commit "
            f"`{_short(report['commit'])}`; the interval pairs the sides within a round, so it "
            f"holds the card's drift between them): " + "; ".join(parts)
            + f".  Details: [{link}]({link})."]


def _profiler_multi(path: Path) -> str:
    report = _load(path)
    one, many = report["runs"][0], report["runs"][-1]
    return (f"Profiling on {many['gpus']} GPUs (`benchmarks/bench_profiler_multi.py`, "
            f"torchrun + NCCL; {report['card']}, {report['date']}, commit "
            f"`{_short(report['commit'])}`): {report['samples']} samples of {report['length']} "
            f"tokens on a {report['layers']}-layer Llama-3-8B shape took {one['seconds']:.1f} s "
            f"on 1 GPU and {many['seconds']:.1f} s on {many['gpus']} ({many['speedup']:.2f}x); "
            f"the profiles agree to {report['max_rel_diff']:.0e} (relative).")


def _sharded_profile(path: Path, base: Path) -> str:
    report = _load(path)
    big, same = report.get("big", {}), report.get("identity", {})
    text = (f"Profiling a model bigger than one GPU (`benchmarks/bench_sharded_profile.py`, "
            f"layers placed over {len(report['devices'])} GPUs; {report['card']}, "
            f"{report['date']}, commit `{_short(report['commit'])}`): ")
    if big.get("runs"):
        text += (f"a random {big['weights_gb']:.0f} GB Llama of the 70B shape took "
                 + ", ".join(f"{r['seconds']:.0f} s per {r['length']}-token sample (peak "
                             + " / ".join("-" if g is None else f"{g:.0f}" for g in r["peak_gib"])
                             + " GiB)"
                             for r in big["runs"]) + "; ")
    if "plain" in same:
        diff = max(same[k][f"max_rel_diff_{part}"] for k in ("plain", "checkpointing")
                   for part in ("far", "sink"))
        text += (f"a model that fits one GPU gives the same profile placed over two (to "
                 f"{diff:.0e} relative); ")
    link = _link(path.with_suffix(".md"), base)
    return text + f"details in [{link}]({link})."


def _optimizer(path: Path, base: Path) -> list[str]:
    report = _load(path)
    meta = report["meta"]
    worst = max(report["results"], key=lambda r: r["seconds"])
    met = sum(r["meets_target"] for r in report["results"])
    details = _link(path.with_suffix(".md"), base)
    return [f"Optimizer scale (`benchmarks/bench_optimizer.py`, {meta['cpu']}, {meta['cores']} "
            f"cores, {meta['date']}, commit `{_short(meta['commit'])}`): {met} of "
            f"{len(report['results'])} instances (32 layers x 8 or 32 heads, {meta['rules']} "
            f"rules, 4 target lengths) solved to <= {meta['gap_target']:.1%} gap within "
            f"{meta['time_limit_s']:.0f} s; slowest {worst['seconds']:.1f} s "
            f"({worst['layers']}x{worst['heads_per_layer']}, budget {worst['budget']}). "
            f"Details: [{details}]({details})."]


def _body(root: Path, base: Path, machine: str, suite: dict[str, Any] | None,
          level: int) -> str:
    h = "#" * level
    parts: list[str] = []
    beds = sorted(root.glob("*/quality-*.json"))
    if beds:
        parts.append(f"{h} Quality: how much of the dense model's behaviour a plan keeps")
        for quality in beds:
            parts += _quality(quality, base, h)
    spans = [path for path in sorted(root.glob("*/query_spans-*.json"))
             if not path.stem.endswith("-quick")]
    if spans:
        parts.append(f"{h} Per-query-head prefill spans (`--attention-budget`)")
        for path in spans:
            parts += _query_spans(path, base)
    # Every machine's speed results, this machine's first: each table names its card.
    speed = [(path, render) for name, render in (("prefill.json", _prefill),
                                                 ("layers.json", _layers),
                                                 ("decode.json", _decode),
                                                 ("decode_e2e.json", _decode_e2e),
                                                 ("first_token.json", _first_token),
                                                 ("first_token_paired.json",
                                                  _first_token_paired))
             for path in _every(root, name, machine)]
    speed.sort(key=lambda item: (item[0].parent.name != machine, item[0].parent.name))
    profiler = _find(root, "profiler.md", machine)
    if speed or profiler:
        parts.append(f"{h} Speed")
        for path, render in speed:
            parts += render(path, base)
        if profiler:
            link = _link(profiler, base)
            parts.append(f"Profiler (`benchmarks/bench_profiler.py`): cost and memory against a "
                         f"plain forward + backward in [{link}]({link}).")
        multi = _find(root, "profiler_multi.json", machine)
        if multi:
            parts.append(_profiler_multi(multi))
        sharded = _find(root, "sharded_profile.json", machine)
        if sharded:
            parts.append(_sharded_profile(sharded, base))
    optimizer = _find(root, "optimizer.json", machine)
    if optimizer:
        parts += [f"{h} Optimizer", *_optimizer(optimizer, base)]
    scorers = _find(root, "scorers.md", machine)
    if scorers:
        link = _link(scorers, base)
        parts += [f"{h} Head scorers and data scoring",
                  f"Top-head overlap of the gradient, retrieval, echo and induction scorers, and "
                  f"the AUC of attention-influence data scoring (`benchmarks/bench_scorers.py`): "
                  f"[{link}]({link})."]
    suites = {path.parent.name: _load(path) for path in sorted(root.glob("*/suite.json"))}
    if suite is not None:
        suites[machine] = suite
    for name, run in suites.items():
        ran = ", ".join(f"{n}: {s['status']}" + (f" ({s['seconds']:.0f} s)" if "seconds" in s
                                                 else f" ({s['reason']})" if "reason" in s else "")
                        for n, s in run["sections"].items())
        where = run["card"] or f"{run['cpu']}, {run['cores']} cores"
        parts.append(f"Last `make bench` run on {name} ({where}): {run['date']}, commit "
                     f"`{_short(run['commit'])}`, {run['seconds'] / 60:.1f} min; {ran}."
                     + (f" {run['note']}." if run.get("note") else ""))
    parts.append("Each result states the machine and commit it was measured on; "
                 "`python benchmarks/run.py --summary-only` redraws the plots and this text "
                 "from the result files.")
    return "\n\n".join(p for p in parts if p) + "\n"


def summary_markdown(root: Path, machine: str, suite: dict[str, Any] | None) -> str:
    """``SUMMARY.md`` beside the machine folders of ``root``; ``machine``'s results first,
    ``suite`` the run that just ended (None: none ran)."""
    return "# Benchmark results\n\n" + _body(root, root, machine, suite, level=2)


def readme_section(root: Path, readme_dir: Path, machine: str,
                   suite: dict[str, Any] | None) -> str:
    """The README's benchmark section (links relative to the README)."""
    return _body(root, readme_dir, machine, suite, level=3)
