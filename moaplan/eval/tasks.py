"""Long-range retrieval prompts built from real text, at an exact token length.

A sample is ``prompt + answer``; the answer is scored token by token (see ``scoring``).
Pieces are tokenized separately and concatenated, so any tokenizer works and the length is
exact: the filler (held-out standard-library text) takes whatever the fixed parts leave.

The needle is placed at ``depth`` (0 = right after the header, 1 = right before the
question).  The header is longer than the 64 sink tokens common in sparse plans, so a needle
at depth 0 is not visible through the sinks alone.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from moaplan.data.corpus import TextCorpus
from moaplan.data.tokens import bos_ids, corpus_ids, encode
from moaplan.errors import DataError

PASSKEY_HEADER = (
    "There is a pass key hidden somewhere in the long text below. "
    "Find the pass key and remember it; you will be asked for it at the end.\n"
)
KV_HEADER = (
    "Several keys with their values are hidden somewhere in the long text below. "
    "Remember every key and its value; you will be asked for one of them at the end.\n"
)
KV_PAIRS = 8  # the queried pair plus seven distractors


@dataclass(frozen=True)
class TaskSample:
    """Token ids of prompt and answer; ``answer_start`` indexes the first answer token."""

    input_ids: list[int]
    answer_start: int
    depth: float
    needle: tuple[int, int]  # [start, end) of the needle that holds the answer

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start :]


def _number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10_000, 100_000)))


def _key(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=5))


def _assemble(
    tokenizer,
    corpus: TextCorpus,
    length: int,
    header: str,
    needles: list[tuple[float, str]],
    question: str,
    answer: str,
    rng: np.random.Generator,
) -> tuple[list[int], tuple[int, int]]:
    """bos + header + filler with each ``(depth, text)`` needle inserted + question + answer,
    and the ``[start, end)`` token span of the first needle (the one asked for)."""
    head = bos_ids(tokenizer) + encode(tokenizer, header)
    pieces = [(d, encode(tokenizer, text)) for d, text in needles]
    tail = encode(tokenizer, question) + encode(tokenizer, answer)
    n_fill = length - len(head) - len(tail) - sum(len(p) for _, p in pieces)
    if n_fill < 1:
        raise DataError(f"length {length} is too short for this task's prompt")
    filler = corpus_ids(tokenizer, corpus, n_fill, rng)
    body, cut, asked = list(head), 0, (0, 0)
    for index in sorted(range(len(pieces)), key=lambda k: pieces[k][0]):
        depth, piece = pieces[index]
        at = round(depth * n_fill)
        body += filler[cut:at]
        if index == 0:
            asked = (len(body), len(body) + len(piece))
        body += piece
        cut = at
    return body + filler[cut:] + tail, asked


def passkey_sample(
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator
) -> TaskSample:
    """Find the 5-digit pass key stated once at ``depth`` in ``length`` tokens of text."""
    key = _number(rng)
    text = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    answer = f" {key}"
    ids, needle = _assemble(
        tokenizer,
        corpus,
        length,
        PASSKEY_HEADER,
        [(depth, text)],
        "\nWhat is the pass key? The pass key is",
        answer,
        rng,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, answer)), depth, needle)


def kv_sample(
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator
) -> TaskSample:
    """Look up one key's 5-digit value among ``KV_PAIRS`` key-value lines scattered in text;
    the queried line sits at ``depth``, the distractors at random depths."""
    keys: list[str] = []
    while len(keys) < KV_PAIRS:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    values = [_number(rng) for _ in keys]
    depths = [depth, *rng.uniform(0.0, 1.0, size=KV_PAIRS - 1)]
    needles = [(d, f"\nThe value of key {k} is {v}.\n") for d, k, v in zip(depths, keys, values)]
    answer = f" {values[0]}"
    ids, asked = _assemble(
        tokenizer,
        corpus,
        length,
        KV_HEADER,
        needles,
        f"\nWhat is the value of key {keys[0]}? The value of key {keys[0]} is",
        answer,
        rng,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, answer)), depth, asked)


TASKS = {"passkey": passkey_sample, "kv": kv_sample}
# Shortest prompts each task fits in with the byte-level tokenizer (others need fewer tokens).
MIN_LENGTH = {"passkey": 256, "kv": 512}
