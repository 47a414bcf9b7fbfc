"""Passkey and key-value retrieval accuracy over a grid of lengths x needle depths."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moaplan.data.corpus import TextCorpus, stdlib_corpus
from moaplan.data.tasks import PHRASINGS, TASKS
from moaplan.eval.scoring import answers_correct

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RetrievalCell:
    length: int
    depth: float
    correct: int
    total: int
    hits: tuple[bool, ...] = ()  # per sample, in the cell's (seeded) sample order

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@dataclass(frozen=True)
class RetrievalResult:
    task: str
    seed: int
    cells: tuple[RetrievalCell, ...]

    def accuracy(self, length: int | None = None) -> float:
        """Accuracy over every cell (of one length, if given)."""
        cells = [c for c in self.cells if length is None or c.length == length]
        return sum(c.correct for c in cells) / sum(c.total for c in cells)

    def table(self) -> str:
        """Markdown table: one row per length, one column per depth, then the row's mean."""
        lengths = sorted({c.length for c in self.cells})
        depths = sorted({c.depth for c in self.cells})
        by_key = {(c.length, c.depth): c for c in self.cells}
        lines = [
            "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
            "|---:|" + "---:|" * (len(depths) + 1),
        ]
        for n in lengths:
            accs = [f"{by_key[n, d].accuracy:.2f}" for d in depths]
            lines.append(f"| {n} | " + " | ".join(accs) + f" | {self.accuracy(n):.2f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "seed": self.seed,
            "accuracy": self.accuracy(),
            "cells": [asdict(c) | {"accuracy": c.accuracy} for c in self.cells],
        }


def cell_rng(seed: int, task: str, length: int, depth: float) -> np.random.Generator:
    """Each cell draws its own samples: a cell's samples do not depend on the rest of the grid."""
    return np.random.default_rng([seed, sorted(TASKS).index(task), length, round(depth * 10_000)])


def retrieval_accuracy(
    task: str,
    model,
    tokenizer,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    corpus: TextCorpus | None = None,
    phrasing: str = "reference",
) -> RetrievalResult:
    """Score ``samples`` prompts of ``task`` ("passkey" or "kv") per (length, depth) cell, in
    the wording ``phrasing`` (a name of :data:`moaplan.data.tasks.PHRASINGS`)."""
    corpus = corpus or stdlib_corpus("heldout")
    wording = PHRASINGS[phrasing]
    cells = []
    for length in lengths:
        for depth in depths:
            rng = cell_rng(seed, task, length, depth)
            prompts = [TASKS[task](tokenizer, corpus, length, depth, rng, wording)
                       for _ in range(samples)]
            hits = answers_correct(model, prompts, batch_size)
            cells.append(RetrievalCell(length, float(depth), sum(hits), len(hits), tuple(hits)))
    return RetrievalResult(task, seed, tuple(cells))


def passkey_accuracy(model, tokenizer, **kwargs) -> RetrievalResult:
    """Passkey retrieval; keyword arguments as in :func:`retrieval_accuracy`."""
    return retrieval_accuracy("passkey", model, tokenizer, **kwargs)


def kv_accuracy(model, tokenizer, **kwargs) -> RetrievalResult:
    """Key-value retrieval among distractors; keyword arguments as in :func:`retrieval_accuracy`."""
    return retrieval_accuracy("kv", model, tokenizer, **kwargs)
