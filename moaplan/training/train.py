"""Train the reference model from scratch on one GPU.

    python -m moaplan.training.train --out DIR [--steps 6000] [--minutes 6] [--seed 0]

Each step draws one length (512..4096) and fills a batch of ~64K tokens with rows of
standard-library text and of passkey / key-value retrieval prompts (filler from the training
split).  The loss is next-token cross-entropy over all tokens plus, separately averaged, over
the answer tokens of the retrieval rows: a few answer tokens per 4K row would otherwise carry
too little signal to teach far retrieval in minutes.

Training ends at ``--steps`` or ``--minutes``, whichever comes first; the learning-rate
schedule follows the same progress measure, so a time-bounded run still ends annealed.
The run writes the model (bf16 safetensors), tokenizer, loss curve (JSON + PNG), a summary
and the model card, after evaluating the dense model on the evaluation tasks.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

from moaplan.data.corpus import TextCorpus, stdlib_corpus
from moaplan.data.tasks import PHRASINGS, TASKS
from moaplan.data.tokens import text_row
from moaplan.eval import kv_accuracy, passkey_accuracy, perplexity
from moaplan.io import atomic_write, atomic_write_text
from moaplan.model.config import CONTEXT, reference_config
from moaplan.model.tokenizer import byte_tokenizer
from moaplan.training.card import plot_loss_curve, write_model_card

# The second test bed's shape: fewer layers, fewer and wider heads, a 2:1 GQA ratio.
SECOND_SHAPE = dict(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@dataclass
class TrainConfig:
    steps: int = 6000
    minutes: float = 6.0
    tokens_per_step: int = 16 * CONTEXT
    lengths: tuple[int, ...] = tuple(range(512, CONTEXT + 1, 512))
    mix: dict[str, float] = field(default_factory=lambda: {"text": 0.4, "passkey": 0.3, "kv": 0.3})
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    probe_every: int = 500
    eval_lengths: tuple[int, ...] = (1024, 2048, CONTEXT)
    eval_samples: int = 20
    model_overrides: dict[str, object] = field(default_factory=dict)
    phrasing: str = "reference"  # the wording of the retrieval tasks (eval.tasks.PHRASINGS)
    workers: int = 6  # processes that build batches while the GPU trains
    stdlib_root: str | None = None  # None: the running interpreter's standard library


def make_batch(
    cfg: TrainConfig, tokenizer, corpus: TextCorpus, length: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, length]`` and ``answer [B, length]`` (True on answer tokens of task rows)."""
    rows, answers = [], []
    kinds, weights = list(cfg.mix), np.array(list(cfg.mix.values()))
    for _ in range(max(1, cfg.tokens_per_step // length)):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        answer = np.zeros(length, dtype=bool)
        if kind == "text":
            ids = text_row(tokenizer, corpus, length, rng)
        else:
            sample = TASKS[kind](tokenizer, corpus, length, float(rng.uniform()), rng,
                                 PHRASINGS[cfg.phrasing])
            ids = sample.input_ids
            answer[sample.answer_start :] = True
        rows.append(ids)
        answers.append(answer)
    return torch.tensor(rows), torch.from_numpy(np.stack(answers))


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches; each DataLoader worker draws from its own seeded generator,
    and the loader takes batches from the workers in a fixed round-robin order."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.tokenizer = byte_tokenizer()
        self.corpus = stdlib_corpus("train", cfg.stdlib_root)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.cfg.seed, info.id if info else 0])
        while True:
            length = int(rng.choice(self.cfg.lengths))
            yield make_batch(self.cfg, self.tokenizer, self.corpus, length, rng)


def losses(model, ids: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over all tokens, and over answer tokens only."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    mask = answer[:, 1:]
    answer_loss = (nll * mask).sum() / mask.sum().clamp(min=1)
    return nll.mean(), answer_loss


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@dataclass
class TrainRun:
    model: torch.nn.Module
    tokenizer: object
    curve: list[dict]  # logged losses, one point every ``log_every`` steps
    probes: list[dict]  # passkey accuracy at the longest length during training
    stats: dict


def train(cfg: TrainConfig, device: str) -> TrainRun:
    torch.manual_seed(cfg.seed)
    stream = BatchStream(cfg)
    tokenizer, corpus = stream.tokenizer, stream.corpus
    batches = iter(
        torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.workers,
            pin_memory=device == "cuda",
            prefetch_factor=4 if cfg.workers else None,
            persistent_workers=False,
        )
    )
    config = reference_config(**cfg.model_overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=device == "cuda",
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    budget_s = cfg.minutes * 60
    curve: list[dict] = []
    probes: list[dict] = []
    start, step, tokens = time.perf_counter(), 0, 0
    print(
        f"training {n_params / 1e6:.2f}M params on {device}, "
        f"corpus {len(corpus.text) / 1e6:.1f}M chars"
    )
    while True:
        elapsed = time.perf_counter() - start
        progress = max(step / cfg.steps, elapsed / budget_s)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, progress)
        ids, answer = (t.to(device, non_blocking=True) for t in next(batches))
        model.train()
        with autocast:
            lm_loss, answer_loss = losses(model, ids, answer)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + answer_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        tokens += ids.numel()
        if step % cfg.log_every == 0:
            point = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 2),
                "tokens": tokens,
                "lr": optimizer.param_groups[0]["lr"],
                "lm_loss": lm_loss.item(),
                "answer_loss": answer_loss.item(),
            }
            curve.append(point)
            if step % (cfg.log_every * 8) == 0:
                print(json.dumps(point), flush=True)
        if cfg.probe_every and step % cfg.probe_every == 0:
            model.eval()
            with autocast:
                probe = passkey_accuracy(
                    model,
                    tokenizer,
                    lengths=(max(cfg.lengths),),
                    depths=(0.0, 0.5, 1.0),
                    samples=4,
                    seed=cfg.seed,
                    corpus=stdlib_corpus("heldout", cfg.stdlib_root),
                    phrasing=cfg.phrasing,
                )
            probes.append({"step": step, "passkey": probe.accuracy()})
            print(f"step {step}: passkey@{max(cfg.lengths)} {probe.accuracy():.2f}", flush=True)
    train_seconds = time.perf_counter() - start
    last = curve[-8:] or [{"lm_loss": float("nan"), "answer_loss": float("nan")}]
    stats = {
        "parameters": n_params,
        "steps": step,
        "tokens": tokens,
        "train_seconds": round(train_seconds, 1),
        "final_lm_loss": float(np.mean([p["lm_loss"] for p in last])),
        "final_answer_loss": float(np.mean([p["answer_loss"] for p in last])),
        "corpus_files": len(corpus.files),
        "corpus_chars": len(corpus.text),
    }
    return TrainRun(model.eval().float(), tokenizer, curve, probes, stats)


def evaluate(model, tokenizer, cfg: TrainConfig) -> dict:
    """Dense accuracy and perplexity on held-out filler, float32."""
    common = dict(
        samples=cfg.eval_samples, seed=cfg.seed, corpus=stdlib_corpus("heldout", cfg.stdlib_root)
    )
    wording = dict(phrasing=cfg.phrasing)
    passkey = passkey_accuracy(model, tokenizer, lengths=cfg.eval_lengths, **common, **wording)
    kv = kv_accuracy(model, tokenizer, lengths=cfg.eval_lengths, **common, **wording)
    ppl = perplexity(
        model, tokenizer, lengths=sorted({cfg.eval_lengths[0], cfg.eval_lengths[-1]}), **common
    )
    return {
        "passkey": passkey.to_dict() | {"table": passkey.table()},
        "kv": kv.to_dict() | {"table": kv.table()},
        "ppl": ppl.to_dict() | {"table": ppl.table()},
    }


def save(out: Path, run: TrainRun, cfg: TrainConfig, evaluation: dict, device_name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run.model.to(torch.bfloat16).save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    atomic_write_text(
        out / "loss_curve.json",
        json.dumps({"curve": run.curve, "passkey_probes": run.probes}, indent=1),
    )
    atomic_write(out / "loss_curve.png", lambda tmp: plot_loss_curve(run.curve, tmp))
    summary = {
        "training": run.stats
        | {
            "config": {k: v for k, v in asdict(cfg).items() if k != "model_overrides"},
            "device": device_name,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "dense_eval": evaluation,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    write_model_card(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moaplan.training.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the trained model")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--eval-samples", type=int, default=TrainConfig.eval_samples)
    parser.add_argument(
        "--stdlib",
        help="standard-library directory to read text from (default: the running interpreter's)",
    )
    parser.add_argument(
        "--second",
        action="store_true",
        help="the second test bed: another shape (6 layers x 4 query / 2 KV heads, head_dim 64) "
        "trained on its own task wording ('record', which no default calibration data uses)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a 2-layer model on 512-token rows: checks the script on a CPU in seconds",
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        steps=args.steps,
        minutes=args.minutes,
        seed=args.seed,
        eval_samples=args.eval_samples,
        stdlib_root=args.stdlib,
    )
    if args.second:
        cfg.phrasing = "record"
        cfg.model_overrides = dict(SECOND_SHAPE)
    if args.tiny:
        cfg.tokens_per_step, cfg.lengths, cfg.eval_lengths, cfg.warmup_steps = (
            1024,
            (512,),
            (512,),
            2,
        )
        cfg.log_every, cfg.probe_every, cfg.workers = 1, 0, 0
        cfg.model_overrides = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.processor() or 'x86_64'})"
    )
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    run = train(cfg, device)
    evaluation = evaluate(run.model, run.tokenizer, cfg)
    save(args.out, run, cfg, evaluation, device_name)
    print(evaluation["passkey"]["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
