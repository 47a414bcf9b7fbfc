"""Long-range retrieval prompts built from real text, at an exact token length.

A sample is ``prompt + answer``; the answer is scored token by token (see
:mod:`moaplan.eval.scoring`).  The prompts are data: the calibration set, the head scorers
and the evaluation all draw from them.  Pieces are tokenized separately and concatenated, so
any tokenizer works and the length is exact: the filler (held-out standard-library text)
takes whatever the fixed parts leave.

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


@dataclass(frozen=True)
class Phrasing:
    """The wording of the retrieval tasks: headers, needles and questions (``{key}`` and
    ``{value}`` are filled in).  A model trained on one wording may not answer another, so the
    calibration data mixes several (:data:`CALIBRATION_PHRASINGS`) and the evaluation of a
    model uses the wording it was trained on."""

    name: str
    passkey_header: str
    passkey_needle: str
    passkey_question: str
    kv_header: str
    kv_needle: str
    kv_question: str


REFERENCE_PHRASING = Phrasing(
    name="reference",
    passkey_header=("There is a pass key hidden somewhere in the long text below. "
                    "Find the pass key and remember it; you will be asked for it at the end.\n"),
    passkey_needle="\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
    passkey_question="\nWhat is the pass key? The pass key is",
    kv_header=("Several keys with their values are hidden somewhere in the long text below. "
               "Remember every key and its value; you will be asked for one of them at the end.\n"),
    kv_needle="\nThe value of key {key} is {value}.\n",
    kv_question="\nWhat is the value of key {key}? The value of key {key} is",
)
PHRASINGS = {p.name: p for p in (
    REFERENCE_PHRASING,
    Phrasing(  # LongLoRA / Landmark-attention style
        name="longlora",
        passkey_header=("There is an important info hidden inside a lot of irrelevant text. "
                        "Find it and memorize it. I will quiz you about the important "
                        "information there.\n"),
        passkey_needle="\nThe pass key is {value}. Remember it. {value} is the pass key.\n",
        passkey_question="\nWhat is the pass key? The pass key is",
        kv_header="Extract the value corresponding to the specified key in the text below.\n",
        kv_needle='\n"{key}": "{value}"\n',
        kv_question='\nKey: "{key}"\nThe value associated with the specified key is: "',
    ),
    Phrasing(  # needle-in-a-haystack style
        name="needle",
        passkey_header=("Read the long document below carefully and answer the question at "
                        "its end.\n"),
        passkey_needle="\nThe special magic number is: {value}.\n",
        passkey_question="\nWhat is the special magic number mentioned in the document? "
                         "The special magic number is:",
        kv_header=("Read the long document below carefully and answer the question at its "
                   "end.\n"),
        kv_needle="\nThe special magic number for {key} is: {value}.\n",
        kv_question="\nWhat is the special magic number for {key}? "
                    "The special magic number for {key} is:",
    ),
    Phrasing(  # the second test bed's own wording; not among the calibration phrasings
        name="record",
        passkey_header=("A secret code is buried somewhere in the archive of files below; "
                        "keep it in mind.\n"),
        passkey_needle="\n[secret code: {value}]\n",
        passkey_question="\nQ: secret code?\nA:",
        kv_header="The archive below holds records; each record has a name and a number.\n",
        kv_needle="\n[record {key} = {value}]\n",
        kv_question="\nQ: record {key}?\nA:",
    ),
)}
# What the default calibration data mixes: the reference wording and two common public ones.
CALIBRATION_PHRASINGS = ("reference", "longlora", "needle")
KV_PAIRS = 8  # the queried pair plus seven distractors


# A chat template's token ids before and after a user message (see ``chat_frame``).
Frame = tuple[list[int], list[int]]


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
    frame: Frame | None = None,
) -> tuple[list[int], tuple[int, int]]:
    """bos + header + filler with each ``(depth, text)`` needle inserted + question + answer,
    and the ``[start, end)`` token span of the first needle (the one asked for).  A chat
    ``frame`` replaces bos with its prefix and puts its suffix between question and answer."""
    prefix, suffix = frame or (bos_ids(tokenizer), [])
    head = list(prefix) + encode(tokenizer, header)
    pieces = [(d, encode(tokenizer, text)) for d, text in needles]
    tail = encode(tokenizer, question) + list(suffix) + encode(tokenizer, answer)
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
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator,
    phrasing: Phrasing = REFERENCE_PHRASING, frame: Frame | None = None,
) -> TaskSample:
    """Find the 5-digit pass key stated once at ``depth`` in ``length`` tokens of text."""
    key = _number(rng)
    answer = f" {key}"
    ids, needle = _assemble(
        tokenizer, corpus, length, phrasing.passkey_header,
        [(depth, phrasing.passkey_needle.format(value=key))], phrasing.passkey_question,
        answer, rng, frame,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, answer)), depth, needle)


def kv_sample(
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator,
    phrasing: Phrasing = REFERENCE_PHRASING, frame: Frame | None = None,
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
    needles = [(d, phrasing.kv_needle.format(key=k, value=v))
               for d, k, v in zip(depths, keys, values)]
    answer = f" {values[0]}"
    ids, asked = _assemble(
        tokenizer, corpus, length, phrasing.kv_header, needles,
        phrasing.kv_question.format(key=keys[0]), answer, rng, frame,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, answer)), depth, asked)


def copy_sample(
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator,
    phrasing: Phrasing = REFERENCE_PHRASING, frame: Frame | None = None,
) -> TaskSample:
    """Copy a marked line of code or text: the line sits at ``depth``; at the end its start is
    repeated and the answer is its rest.  Needs no instruction following, only the copying
    that any language model learns (induction), so it finds retrieval heads in any model."""
    del phrasing  # one wording: the line itself is the cue
    line = ""
    while len(line) < 24:
        line = max(corpus.chunk(rng, 400).splitlines() or [""], key=len).strip()[:80]
    cue, rest = line[: len(line) // 2], line[len(line) // 2 :]
    ids, needle = _assemble(
        tokenizer, corpus, length,
        "Remember the line marked with >>> in the long text below; you will repeat it.\n",
        [(depth, f"\n>>> {line}\n")], f"\nRepeat the marked line.\n>>> {cue}", rest, rng,
        frame,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, rest)), depth, needle)


def repeat_sample(
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator,
    phrasing: Phrasing = REFERENCE_PHRASING, frame: Frame | None = None,
) -> TaskSample:
    """Continue a line of random words and numbers seen once at ``depth``, cued by its first
    two items: pure induction, with no wording to understand and nothing the filler could
    predict, so every answer token depends on the far line."""
    del phrasing
    items = [_key(rng) if i % 2 == 0 else _number(rng) for i in range(8)]
    cue, rest = " ".join(items[:2]), " " + " ".join(items[2:])
    ids, needle = _assemble(
        tokenizer, corpus, length,
        "The long text below holds one line of random words; its start comes again at the end.\n",
        [(depth, f"\n{cue}{rest}\n")], f"\n{cue}", rest, rng, frame,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, rest)), depth, needle)


def multidoc_sample(
    tokenizer, corpus: TextCorpus, length: int, depth: float, rng: np.random.Generator,
    phrasing: Phrasing = REFERENCE_PHRASING, frame: Frame | None = None,
) -> TaskSample:
    """Multi-document question answering from the filler: ``KV_PAIRS`` documents, each
    opened by a title and a 5-digit number; the question names one document by its title
    (the one at ``depth``) and asks for its number."""
    del phrasing
    titles: list[str] = []
    while len(titles) < KV_PAIRS:
        title = f"{_key(rng)} {_key(rng)}"
        if title not in titles:
            titles.append(title)
    numbers = [_number(rng) for _ in titles]
    depths = [depth, *rng.uniform(0.0, 1.0, size=KV_PAIRS - 1)]
    docs = [(d, f"\n\nDocument: {t}\nNumber: {n}\n") for d, t, n in zip(depths, titles, numbers)]
    answer = f" {numbers[0]}"
    ids, asked = _assemble(
        tokenizer, corpus, length,
        "Several documents follow, each with a title and a number. Answer the question after "
        "them.\n",
        docs, f"\n\nWhat is the number of the document titled {titles[0]}? Number:", answer,
        rng, frame,
    )
    return TaskSample(ids, len(ids) - len(encode(tokenizer, answer)), depth, asked)


def chat_frame(tokenizer) -> Frame | None:
    """A tokenizer's chat template around one user message, as token ids before and after
    the message (the generation prompt included), or None without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00MOAPLAN\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                         add_generation_prompt=True, tokenize=False)
    if text.count(marker) != 1:
        return None
    before, after = text.split(marker)
    return encode(tokenizer, before), encode(tokenizer, after)


TASKS = {"passkey": passkey_sample, "kv": kv_sample}
# Every family the default calibration data draws from (retrieval tasks besides ``TASKS``).
CALIBRATION_TASKS = {**TASKS, "repeat": repeat_sample, "copy": copy_sample,
                     "multidoc": multidoc_sample}
# Shortest prompts each task fits in with the byte-level tokenizer (others need fewer tokens).
MIN_LENGTH = {"passkey": 256, "kv": 512, "repeat": 256, "copy": 256, "multidoc": 640}
