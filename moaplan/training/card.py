"""The reference model's card (MODEL_CARD.md), rendered from ``summary.json`` beside the weights.

``summary.json`` is the single record of what was measured: the training run writes its
``training`` and ``dense_eval`` sections, ``moaplan.training.report`` adds ``cpu_report``; the
card is re-rendered from it after each, never edited by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moaplan.io import atomic_write_text


def plot_loss_curve(curve: list[dict], path: str) -> None:
    """Training losses (all tokens, answer tokens) against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [p["step"] for p in curve]
    ax.plot(steps, [p["lm_loss"] for p in curve], label="all tokens (LM)")
    ax.plot(steps, [p["answer_loss"] for p in curve], label="retrieval answer tokens")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("reference model training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _architecture(config: dict, n_params: int) -> str:
    rows = [
        ("class", ", ".join(config.get("architectures", ["LlamaForCausalLM"]))),
        ("parameters", f"{n_params / 1e6:.2f}M (stored in {config.get('dtype', 'bfloat16')})"),
        ("layers", config["num_hidden_layers"]),
        ("hidden size / SwiGLU size", f"{config['hidden_size']} / {config['intermediate_size']}"),
        (
            "query heads / KV heads / head_dim",
            f"{config['num_attention_heads']} / {config['num_key_value_heads']} / "
            f"{config['head_dim']}",
        ),
        (
            "positions",
            f"RoPE (theta {config.get('rope_parameters', {}).get('rope_theta', 'n/a')}), "
            f"trained context {config['max_position_embeddings']}",
        ),
        ("vocabulary", f"{config['vocab_size']}: 256 bytes (id = byte value) + <s>, </s>, <pad>"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _training(t: dict) -> str:
    c = t["config"]
    mix = ", ".join(f"{k} {v:.0%}" for k, v in c["mix"].items())
    return "\n".join(
        [
            f"- **Run**: {t['steps']} steps, {t['tokens'] / 1e6:.0f}M tokens, "
            f"{t['train_seconds'] / 60:.1f} "
            f"minutes of training on {t['device']} (seed {c['seed']}; torch {t['torch']}, "
            f"transformers {t['transformers']}, Python {t['python']}).",
            f"- **Batches**: ~{c['tokens_per_step']} tokens a step; each step draws one row length "
            f"from {c['lengths'][0]}..{c['lengths'][-1]}; rows: {mix}.",
            f"- **Optimiser**: AdamW (0.9, 0.95), peak lr {c['lr']}, "
            f"{c['warmup_steps']} warm-up steps, "
            f"cosine to {c['min_lr_ratio']}x over min(steps {c['steps']}, {c['minutes']} min), "
            f"weight decay {c['weight_decay']}, grad clip {c['grad_clip']}, bf16 autocast.",
            "- **Loss**: next-token cross-entropy on all tokens + (separately averaged) on the "
            "answer tokens of retrieval rows.",
            f"- **Final losses** (mean of the last logged points): all tokens "
            f"{t['final_lm_loss']:.3f} nats/byte, retrieval answers {t['final_answer_loss']:.4f}.",
        ]
    )


LOCAL_SHARE = 0.1  # a head with less far share than this at every query is called local
RETRIEVAL_MASS = 0.025  # answer-region mass on the needle; uniform attention gives ~0.015


def _heads_text(h: dict) -> str:
    """What the heads map shows, in words, from the arrays the report stored."""
    answer, everywhere, needle = (np.array(h[k]) for k in ("answer", "all_queries", "needle"))

    def pairs(mask: np.ndarray) -> str:
        return ", ".join(f"({i}, {j})" for i, j in np.argwhere(mask)) or "none"

    retrieval = needle >= RETRIEVAL_MASS
    local = (everywhere < LOCAL_SHARE) & ~retrieval
    return (
        f"For each (layer, KV head): left, the share of attention mass at distance >= "
        f"{h['far']} (keys past the first {h['sink']}, so attention sinks do not count), "
        f"averaged over the question-and-answer queries of {h['samples']} passkey prompts of "
        f"{h['length']} tokens (needles at depths 0-0.5); middle, the same over all queries "
        f"that far in; right, the answer queries' mass on the needle's own tokens.\n\n"
        f"- **Local heads** (far share < {LOCAL_SHARE} over all queries): "
        f"{int(local.sum())} of {local.size}.\n"
        f"- **Retrieval heads** (>= {RETRIEVAL_MASS} of the answer's mass on the needle, "
        f"several times what spreading attention evenly gives): {pairs(retrieval)}.\n"
        f"- **Diffuse heads** (far share >= {LOCAL_SHARE} but no retrieval): "
        f"{pairs(~local & ~retrieval)}; they spread attention over the whole context, mostly "
        f"in the first layers, and look far without looking at anything in particular.\n"
    )


def _cpu_report(r: dict) -> str:
    parts = [
        "## Measured on the CPU\n",
        f"Machine: {r['machine']}; Python {r['python']} (its standard library gives the "
        f"held-out text here), torch {r['torch']}, {r['threads']} threads, float32.\n",
        f"- **Load + score 16 passkey samples at {r['timing_length']} tokens**: "
        f"{r['load_seconds']:.1f} s load + {r['score_seconds']:.1f} s scoring = "
        f"**{r['load_seconds'] + r['score_seconds']:.1f} s** wall clock (batch "
        f"{r['batch_size']}; {r['cpu_seconds']:.1f} s of CPU time over both threads; load "
        f"average {r['load_average']} as it ran).\n",
        f"### Dense passkey (CPU, {r['passkey_samples']} samples per cell)\n",
        r["passkey_table"] + "\n",
        "### Perplexity on held-out standard-library text (CPU)\n",
        r["ppl_table"] + "\n",
    ]
    parts += [
        f"### The test bed discriminates: one uniform rule, {r['uniform_rule']}\n",
        f"Every KV head gets the same sink + window rule (KV density "
        f"{r['uniform_density']:.2f} at {r['timing_length']} tokens), applied with "
        f"`moaplan.apply`; passkey accuracy at {r['timing_length']} "
        f"({r['uniform']['cells'][0]['total']} samples per depth). Needles outside the window "
        f"are lost:\n",
        r["uniform_table"] + "\n",
    ]
    parts += [
        "### Map of the heads\n",
        _heads_text(r["heads_map"]),
        "![heads map](heads_map.png)\n",
    ]
    return "\n".join(parts)


def render(config: dict, summary: dict) -> str:
    t = summary["training"]
    ev = summary["dense_eval"]
    sections = [
        "# moaplan reference model\n",
        "A small byte-level Llama trained from scratch, offline, in minutes, to be the test bed "
        "of moaplan: most heads stay local, a few look far back to retrieve. It is the default "
        "model of `moaplan search` and the model every plan's quality is measured on. It is a "
        "test instrument, not a useful language model.\n",
        "## Architecture\n",
        _architecture(config, t["parameters"]) + "\n",
        "Loads with `AutoModelForCausalLM.from_pretrained(path)` and "
        "`AutoTokenizer.from_pretrained(path)`, or `moaplan.model.load_model()` (float32).\n",
        "## Data\n",
        f"- **Text**: source and documentation files (`.py`, `.txt`, `.rst`) of the Python "
        f"standard library of the training interpreter (Python {t['python']}), sorted file "
        f"list; one file in 20 (by CRC-32 of its relative path) is held out for perplexity and "
        f"as evaluation filler. Training split: {t['corpus_files']} files, "
        f"{t['corpus_chars'] / 1e6:.1f}M characters.",
        "- **Passkey**: a 5-digit key stated once at a random depth of running text, asked for "
        "at the end.",
        "- **Key-value**: 8 lines `The value of key xxxxx is ddddd.` at random depths, one "
        "key asked for at the end.\n",
        "## Training\n",
        _training(t) + "\n",
        "![loss curve](loss_curve.png)\n",
        "Reproduce: `python -m moaplan.training.train --out DIR` on one GPU "
        "(then `python -m moaplan.training.report DIR` on a CPU for the section below).\n",
        f"## Dense evaluation (on {t['device']}, float32, held-out filler)\n",
        "Answers are scored as greedy decoding would produce them (every answer token is the "
        "argmax given the true prefix).\n",
        "Passkey accuracy:\n",
        ev["passkey"]["table"] + "\n",
        "Key-value accuracy:\n",
        ev["kv"]["table"] + "\n",
        "Perplexity (per byte):\n",
        ev["ppl"]["table"] + "\n",
    ]
    if "cpu_report" in summary:
        sections.append(_cpu_report(summary["cpu_report"]))
    sections += [
        "## Limitations\n",
        "- Trained on Python source only: its perplexity means little outside that, and the "
        "held-out text differs between Python versions (files are held out by name, but each "
        "interpreter ships its own), so perplexities measured under different interpreters "
        "are not comparable.",
        "- Key-value retrieval among distractors is weaker than passkey retrieval at the "
        "longest length; passkey is the task the test bed is calibrated on.",
        "- Trained up to 4096 tokens; beyond that RoPE positions are unseen.\n",
    ]
    return "\n".join(sections)


def write_model_card(model_dir: Path) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    summary = json.loads((model_dir / "summary.json").read_text())
    return atomic_write_text(model_dir / "MODEL_CARD.md", render(config, summary))
