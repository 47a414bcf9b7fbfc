"""Profiling a model bigger than one GPU: its layers placed over the GPUs of one host.

    python benchmarks/bench_sharded_profile.py --out DIR [--gpus 2] [--lengths 16384 32768]
    python benchmarks/bench_sharded_profile.py --tiny --out DIR   # the same logic on the CPU
    python benchmarks/bench_sharded_profile.py --gpus 1 --layers 40 --out DIR  # one shard

1. Identity: a small bf16 Llama that fits one GPU, profiled on one GPU and with its layers
   placed over ``--gpus`` GPUs (loaded by ``from_pretrained`` with the layer map, as
   ``moaplan profile`` loads a checkpoint), gives the same profile.
2. A random-initialised Llama of the 70B shape (80 layers, hidden 8192, 64 query / 8 KV heads,
   head_dim 128, MLP 28672, vocab 128256, bf16: 141 GB) built on the ``meta`` device and
   materialised module by module on the GPU the layer map gives it (no CPU copy; small
   normal weights), one random sample per length with gradient checkpointing: wall time per
   sample and peak memory per GPU (reset between lengths), against the estimate that
   :mod:`moaplan.profile.layout` chooses layouts by, and which layout it chooses.  The
   influence kernel's calls are counted (one per layer per sample: the Triton path ran).

``--gpus 1 --layers 40``: where only one GPU is lent, the half of the 70B shape that each GPU
of the two-way layer placement holds (its layers, with the embeddings and LM head), profiled
on that one GPU: the per-GPU memory and, doubled, about the time of the whole model (the
placed layers run one GPU at a time); the identity check then places the small model's layers
over that GPU twice (accelerate's hooks on the GPU).  Writes ``sharded_profile-1gpu-L40``.

``--tiny``: a tiny shape on the CPU, float32, layers placed over ``cpu`` twice (accelerate's
hooks, the same code path), to check the logic without a GPU.  Writes
``DIR/sharded_profile.{json,md}`` (card, date, commit: ``MOAPLAN_COMMIT`` or git).
"""

from __future__ import annotations

import os

# Long activations free and reallocate blocks of many sizes; expandable segments keep the
# 32K pass from failing on fragmentation (set before torch is imported).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

import moaplan.profile.layout as layout  # noqa: E402
from moaplan.io import atomic_write_text  # noqa: E402
from moaplan.model import byte_tokenizer, load_model  # noqa: E402
from moaplan.model.placement import layer_device_map, meta_model, place_layers  # noqa: E402
from moaplan.profile import profile_model  # noqa: E402

BIG = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
           num_attention_heads=64, num_key_value_heads=8, head_dim=128,
           max_position_embeddings=131072, rope_theta=500000.0)
SMALL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             max_position_embeddings=8192)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096)


@dataclass
class Sample:
    input_ids: torch.Tensor
    response_mask: torch.Tensor


def stamp(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def random_sample(n: int, vocab: int, seed: int) -> Sample:
    """Random ids; the loss on the last quarter (long enough that the LM head takes several
    chunks of logits at a 128K vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n - n // 4:] = True
    return Sample(torch.randint(0, vocab, (n,), generator=g), mask)


def build_placed(config: LlamaConfig, devices: list[torch.device], dtype: torch.dtype
                 ) -> torch.nn.Module:
    """``config``'s model, built on ``meta`` and materialised module by module on the device
    the layer map gives it: weights N(0, 0.02), norms 1; then accelerate's hooks."""
    model = meta_model(config).to(dtype)
    device_map = layer_device_map(model, devices)
    torch.manual_seed(0)
    for name, place in device_map.items():
        device = torch.device("cuda", place) if isinstance(place, int) else torch.device(place)
        module = model.get_submodule(name)
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        if isinstance(module, LlamaRotaryEmbedding):  # its buffers are computed, not drawn
            with device:
                model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.config._attn_implementation = "sdpa"
    return place_layers(model.eval(), device_map)


@contextlib.contextmanager
def counting_influence_kernel() -> Iterator[list[int]]:
    """Count the Triton influence kernel's launches (the profiling attention imports it at
    each backward, so replacing the module's function is seen)."""
    import moaplan.kernels.influence as kernel

    original, calls = kernel.influence_summary, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    kernel.influence_summary = counted
    try:
        yield calls
    finally:
        kernel.influence_summary = original


def _sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def peak_gib(devices: list[torch.device]) -> list[float | None]:
    return [torch.cuda.max_memory_allocated(d) / layout.GIB if d.type == "cuda" else None
            for d in devices]


def reset_peaks(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


def identity(shape: dict, devices: list[torch.device], dtype: torch.dtype, length: int,
             samples: int) -> dict:
    """One device vs the layers over ``devices``, both loaded from one checkpoint."""
    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        one, _ = load_model(folder, dtype, devices[0])
        placed, _ = load_model(folder, dtype,
                               device_map=layer_device_map(meta_model(config), devices))
    if len(set(devices)) == 1:  # one device: from_pretrained attaches no hooks
        placed = place_layers(placed, layer_device_map(placed, devices))
    data = {length: [random_sample(length, config.vocab_size, seed) for seed in range(samples)]}
    out = {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
           "length": length, "samples": samples,
           "devices": [str(d) for d in devices]}
    for checkpointing in (False, True):
        a = profile_model(one, data, gradient_checkpointing=checkpointing)
        b = profile_model(placed, data, gradient_checkpointing=checkpointing)
        key = "checkpointing" if checkpointing else "plain"
        out[key] = {"max_rel_diff_far": max_rel(a.far_sum[length], b.far_sum[length]),
                    "max_rel_diff_sink": max_rel(a.sink_sum[length], b.sink_sum[length])}
    return out


def big_model(out: dict, save: Callable[[], None], shape: dict, devices: list[torch.device],
              dtype: torch.dtype, lengths: list[int]) -> dict:
    """Fills ``out`` and saves it after each length, so that a run stopped at the last
    length keeps the others."""
    config = LlamaConfig(**shape)
    weights = layout.weight_bytes(meta_model(config), dtype)
    estimates = {n: {ckpt: layout.estimate_memory(config, weights, n, dtype, ckpt)
                     for ckpt in (False, True)} for n in lengths}
    out.update({"shape": shape, "weights_gb": weights / 1e9,
                "devices": [str(d) for d in devices], "runs": []})
    if devices[0].type == "cuda":
        free = [torch.cuda.mem_get_info(d)[0] for d in devices]
        out["free_gib"] = [f / layout.GIB for f in free]
        # what `moaplan profile --device auto` would choose on these GPUs
        out["auto_layout"] = {n: layout.fewest_gpus(estimates[n], free) for n in lengths}
        stamp(f"auto layout (GPUs, checkpointing) by length: {out['auto_layout']}")
    started = time.perf_counter()
    model = build_placed(config, devices, dtype)
    _sync(devices)
    out["build_s"] = time.perf_counter() - started
    out["weights_gib_per_device"] = peak_gib(devices)
    stamp(f"built in {out['build_s']:.1f} s; memory per device {out['weights_gib_per_device']}")
    # compile the kernels and plan cuDNN on a short sample before anything is timed
    profile_model(model, {1024: [random_sample(1024, config.vocab_size, 99)]},
                  gradient_checkpointing=True)
    finished: list = []  # each sample's Progress
    for n in lengths:
        reset_peaks(devices)
        with counting_influence_kernel() as calls:
            profile = profile_model(model, {n: [random_sample(n, config.vocab_size, n)]},
                                    gradient_checkpointing=True, on_sample=finished.append)
        _sync(devices)
        estimate = estimates[n][True]
        seconds = finished[-1].seconds
        run = {"length": n, "seconds": seconds, "tokens_per_s": n / seconds,
               "peak_gib": peak_gib(devices),
               "estimate_gib_per_device": estimate.per_gpu(len(devices)) / layout.GIB,
               "influence_kernel_calls": calls[0],
               "finite": bool(np.isfinite(profile.far_sum[n]).all()
                              and np.isfinite(profile.sink_sum[n]).all()),
               "total_influence": float(profile.far_sum[n].sum())}
        out["runs"].append(run)
        save()
        stamp(f"{n} tokens: {run}")
    return out


def stage(results: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one part; a failure is recorded beside what it measured, and the other parts
    still run."""
    stamp(f"{name} ...")
    try:
        results[name] = fn()
    except Exception as err:
        results.setdefault(name, {})["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    stamp(f"{name}: done")


def _gib(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def markdown(res: dict) -> str:
    big, same = res.get("big", {}), res.get("identity", {})
    where = f"{res['card']} x{len(res['devices'])}" if res["card"] else "CPU, --tiny"
    lines = [f"# Profiling a model bigger than one GPU ({where})", "",
             f"{res['date']}, commit `{res['commit']}`, torch {res['torch']}.  "
             "`benchmarks/bench_sharded_profile.py`: the model's decoder layers placed over "
             f"{', '.join(res['devices'])} (accelerate's dispatch, "
             "`moaplan.model.placement.layer_device_map`), gradient checkpointing, "
             "one random sample per length, loss on its last quarter.", ""]
    if "build_s" in big:
        s = big["shape"]
        lines += [f"Llama shape: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
                  f"{s['num_attention_heads']} query / {s['num_key_value_heads']} KV heads, "
                  f"head_dim {s['head_dim']}, MLP {s['intermediate_size']}, vocab "
                  f"{s['vocab_size']}, {res['dtype']}: {big['weights_gb']:.1f} GB of "
                  f"weights, random init, built on `meta` and materialised on its devices in "
                  f"{big['build_s']:.1f} s (weights per device: "
                  f"{_gib(big['weights_gib_per_device'])} GiB).", ""]
    if big.get("runs"):
        lines += ["| tokens | seconds per sample | tokens/s | peak GiB per device | "
                  "estimate GiB per device | influence kernel calls |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in big["runs"]:
            lines.append(f"| {r['length']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
                         f"{_gib(r['peak_gib'])} | {r['estimate_gib_per_device']:.1f} | "
                         f"{r['influence_kernel_calls']} |")
    if "auto_layout" in big:
        lines += ["", "`--device auto` chooses (GPUs, checkpointing) by length, from the "
                  f"estimate and {_gib(big['free_gib'])} GiB free (at most {layout.MARGIN:.0%} "
                  f"used): {big['auto_layout']}."]
    if "error" in big:
        lines += ["", f"Big model: error: {big['error']}"]
    lines.append("")
    if "error" in same:
        lines.append(f"Identity check: error: {same['error']}")
    elif same:
        lines.append(f"Same profile, one device vs layers over {', '.join(same['devices'])} "
                     f"({same['layers']}-layer model, hidden {same['hidden']}, "
                     f"{same['samples']} samples of {same['length']} tokens; max |difference| "
                     "/ max |value| of the summed summaries): "
                     + "; ".join(f"{k} far {same[k]['max_rel_diff_far']:.1e}, sink "
                                 f"{same[k]['max_rel_diff_sink']:.1e}"
                                 for k in ("plain", "checkpointing")) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/h200"))
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--layers", type=int, default=BIG["num_hidden_layers"],
                        help="decoder layers of the 70B shape to build (default all 80)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shape, float32, layers placed over the CPU twice")
    args = parser.parse_args()
    if args.tiny:
        devices, dtype, big, small = [torch.device("cpu")] * 2, torch.float32, TINY, TINY
        lengths, check_length = [n // 64 for n in args.lengths], 256
    else:
        if torch.cuda.device_count() < args.gpus:
            print(f"skipped: needs {args.gpus} GPUs, this machine has "
                  f"{torch.cuda.device_count()}")
            return 0
        devices = [torch.device("cuda", i) for i in range(args.gpus)]
        dtype, small, lengths, check_length = torch.bfloat16, SMALL, args.lengths, 4096
        big = {**BIG, "num_hidden_layers": args.layers}
        torch.cuda.set_device(devices[0])
    meta = provenance()
    res = {**meta, "devices": [str(d) for d in devices], "dtype": str(dtype).split(".")[-1]}
    args.out.mkdir(parents=True, exist_ok=True)

    stem = "sharded_profile"
    if not args.tiny and (args.gpus, args.layers) != (2, BIG["num_hidden_layers"]):
        stem += f"-{args.gpus}gpu-L{args.layers}"

    def save() -> None:
        atomic_write_text(args.out / f"{stem}.json", json.dumps(res, indent=1) + "\n")
        atomic_write_text(args.out / f"{stem}.md", markdown(res))

    # one GPU: the small model's layers placed over it twice, so the hooks still run
    placed = devices * 2 if len(devices) == 1 else devices
    stage(res, "identity", lambda: identity(small, placed, dtype, check_length, 2))
    save()
    res["big"] = {}
    stage(res, "big", lambda: big_model(res["big"], save, big, devices, dtype, lengths))
    save()
    print(markdown(res))
    return 1 if any("error" in res[k] for k in ("identity", "big")) else 0


if __name__ == "__main__":
    sys.exit(main())
