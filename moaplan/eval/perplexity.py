"""Perplexity on held-out standard-library text, at each of several context lengths."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moaplan.data.corpus import TextCorpus, stdlib_corpus
from moaplan.data.tokens import text_row
from moaplan.eval.scoring import batches, token_nll


@dataclass(frozen=True)
class PerplexityCell:
    length: int
    tokens: int
    nll: float  # mean negative log-likelihood per predicted token, in nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)


@dataclass(frozen=True)
class PerplexityResult:
    seed: int
    cells: tuple[PerplexityCell, ...]

    def table(self) -> str:
        lines = [
            "| length | tokens | NLL (nats) | bits/token | perplexity |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c in self.cells:
            lines.append(
                f"| {c.length} | {c.tokens} | {c.nll:.4f} | {c.bits_per_token:.4f} "
                f"| {c.perplexity:.3f} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "task": "ppl",
            "seed": self.seed,
            "cells": [
                asdict(c) | {"perplexity": c.perplexity, "bits_per_token": c.bits_per_token}
                for c in self.cells
            ],
        }


def perplexity(
    model,
    tokenizer,
    lengths: Sequence[int] = (1024, 4096),
    samples: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    corpus: TextCorpus | None = None,
) -> PerplexityResult:
    """Mean NLL over ``samples`` windows of ``length`` tokens (bos + text) per length."""
    corpus = corpus or stdlib_corpus("heldout")
    cells = []
    for length in lengths:
        rng = np.random.default_rng([seed, length])
        rows = [text_row(tokenizer, corpus, length, rng) for _ in range(samples)]
        total = sum(
            float(token_nll(model, torch.tensor(b)).sum()) for b in batches(rows, batch_size)
        )
        n_tokens = samples * (length - 1)
        cells.append(PerplexityCell(length, n_tokens, total / n_tokens))
    return PerplexityResult(seed, tuple(cells))
