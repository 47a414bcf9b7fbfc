"""Text to token ids for any tokenizer, with exact lengths."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from moaplan.data.corpus import TextCorpus


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    # verbose=False: texts longer than the model's context are cut afterwards, on purpose
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def bos_ids(tokenizer) -> list[int]:
    """``[bos]``, or ``[]`` for tokenizers without a beginning-of-sequence token."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def corpus_ids(tokenizer, corpus: TextCorpus, n_tokens: int, rng: np.random.Generator) -> list[int]:
    """Exactly ``n_tokens`` tokens of running text from a random place in ``corpus``."""
    n_chars = n_tokens + 16
    while True:
        ids = encode(tokenizer, corpus.chunk(rng, n_chars))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        n_chars *= 2


def text_row(tokenizer, corpus: TextCorpus, length: int, rng: np.random.Generator) -> list[int]:
    """A sequence of exactly ``length`` tokens: bos, then running text."""
    bos = bos_ids(tokenizer)
    return bos + corpus_ids(tokenizer, corpus, length - len(bos), rng)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
