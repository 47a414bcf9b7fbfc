"""Calibration data for the profiler: token ids plus a mask of the tokens the loss is taken on.

Following MoA, the loss is taken on *model-aligned* responses: long prompts (retrieval tasks
in several wordings, copying, multi-document lookup, running text) are completed greedily by
the dense model itself.
Users bring JSONL prompt/response pairs (formatted with the tokenizer's chat template when it
has one) or plain text (every token after the first counts).

``response_mask[t]`` is True when the loss of predicting token ``t`` from tokens ``< t``
counts, so ``response_mask[0]`` is always False.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moaplan.data.corpus import TextCorpus, stdlib_corpus
from moaplan.data.tasks import (
    CALIBRATION_PHRASINGS,
    CALIBRATION_TASKS,
    MIN_LENGTH,
    PHRASINGS,
    chat_frame,
)
from moaplan.data.tokens import batches, bos_ids, encode, text_row
from moaplan.errors import DataError


@dataclass(frozen=True)
class CalibrationSample:
    input_ids: torch.Tensor  # LongTensor [N]
    response_mask: torch.Tensor  # BoolTensor [N], True on response tokens
    # whether the dense model's own response held the task's answer; when it did not, the
    # response is the task's answer, teacher-forced (None: no known answer, e.g. running
    # text or a user's record)
    answered: bool | None = None

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.response_mask.shape or self.input_ids.dim() != 1:
            raise ValueError("input_ids and response_mask must be 1-D tensors of equal length")


def _sample(prompt: list[int], response: list[int], scored: int | None = None,
            answered: bool | None = None) -> CalibrationSample:
    """``prompt + response`` with the loss on the first ``scored`` response tokens (all if
    None)."""
    mask = torch.zeros(len(prompt) + len(response), dtype=torch.bool)
    mask[len(prompt) : len(prompt) + (len(response) if scored is None else scored)] = True
    mask[0] = False
    return CalibrationSample(torch.tensor(prompt + response, dtype=torch.long), mask, answered)


# The families the default calibration data cycles through (those that fit the length):
# retrieval in several wordings, repeating a far line of random words (induction, with no
# wording to understand), copying, multi-document lookup, and running text.
DEFAULT_KINDS = ("passkey", "kv", "repeat", "copy", "text", "multidoc")
TEXT_RESPONSE_TOKENS = 64  # what the model writes after a plain text prompt
HELD_OUT_SEED_OFFSET = 1000  # held-out samples: seed + this, far from any profiling seed
CHAT_ANSWER_TOKENS = 16  # scored after a chat prompt: chat models often restate the question


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    scored: int | None  # response tokens the loss is taken on (None: all)
    respond: int  # response tokens to generate
    answer: list[int] | None = None  # the task's own answer (None: running text)


def _prompt(kind: str, wording: str, tokenizer, corpus, length: int, depth: float,
            rng: np.random.Generator, frame) -> _Prompt:
    """One calibration prompt of ``kind`` (a retrieval prompt in ``wording``) that leaves
    room for the answer only."""
    if kind == "text":
        return _Prompt(text_row(tokenizer, corpus, length - TEXT_RESPONSE_TOKENS, rng), None,
                       TEXT_RESPONSE_TOKENS)
    phrasing = PHRASINGS[wording]
    # The model writes its response in place of the task's own answer (and a few more tokens
    # after a chat prompt), so the whole sample is ``length`` tokens.
    extra = CHAT_ANSWER_TOKENS if frame else 0
    task = CALIBRATION_TASKS[kind](tokenizer, corpus, length - extra, depth, rng, phrasing,
                                   frame)
    respond = len(task.answer_ids) + extra
    return _Prompt(task.input_ids[: task.answer_start], respond, respond, task.answer_ids)


@torch.inference_mode()
def model_calibration(
    model,
    tokenizer,
    length: int,
    n_samples: int,
    seed: int,
    batch_size: int = 8,
    corpus: TextCorpus | None = None,
    wordings: tuple[str, ...] = CALIBRATION_PHRASINGS,
) -> list[CalibrationSample]:
    """``n_samples`` sequences of at most ``length`` tokens for any causal LM: long prompts of
    the :data:`DEFAULT_KINDS` families in turn (retrieval in several wordings, copying,
    multi-document lookup, running text; filler from the training split of the standard
    library, through the tokenizer's chat template when it has one) completed greedily by
    ``model``, which should be dense (MoA's *model-aligned* data).  Each round of the
    families takes the next of ``wordings`` (names of :data:`moaplan.data.tasks.PHRASINGS`).

    On a text prompt the loss is taken on every generated token; on a retrieval prompt on the
    model's answer alone (as many tokens as the task's answer has, more after a chat prompt):
    what a model rambles on with after answering depends on recent text only, and would drown
    the few tokens that depend on the needle.  Needle depths are stratified over the retrieval
    prompts, so that even a few samples include a needle far back; a prompt is built around
    its needles at the exact length, never cut.  Each task sample records whether the model
    answered it (:attr:`CalibrationSample.answered`); where it did not, the sample's response
    is the task's answer instead of the model's (after a chat prompt it is then
    :data:`CHAT_ANSWER_TOKENS` shorter than ``length``)."""
    if length < 4 * TEXT_RESPONSE_TOKENS:
        raise DataError(f"length {length} is too short for calibration prompts; give lengths "
                        f"of at least {4 * TEXT_RESPONSE_TOKENS} tokens")
    corpus = corpus or stdlib_corpus("train")
    frame = chat_frame(tokenizer)
    rng = np.random.default_rng([seed, length])
    kinds = [k for k in DEFAULT_KINDS if length >= 2 * MIN_LENGTH.get(k, 0)] or ["text"]
    sample_kinds = [kinds[i % len(kinds)] for i in range(n_samples)]
    n_tasks = sum(kind != "text" for kind in sample_kinds)
    depths = iter((np.arange(n_tasks) + rng.uniform(size=n_tasks)) / max(n_tasks, 1))
    # One round of the families per wording: the first round in the reference wording.
    prompts = [_prompt(kind, wordings[i // len(kinds) % len(wordings)], tokenizer, corpus, length,
                       0.0 if kind == "text" else float(next(depths)), rng, frame)
               for i, kind in enumerate(sample_kinds)]
    responses: dict[int, list[int]] = {}
    # prompts of one shape are completed together: one batch, no padding
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((len(p.ids), p.respond), []).append(i)
    for (_, respond), rows in sorted(groups.items()):
        for chunk in batches(rows, batch_size):
            ids = torch.tensor([prompts[i].ids for i in chunk], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=respond, min_new_tokens=respond,
                                 do_sample=False)
            responses.update(zip(chunk, out[:, ids.shape[1]:].tolist()))
    samples = []
    for i, p in enumerate(prompts):
        answered = _answered(tokenizer, p.answer, responses[i])
        if answered is False:
            # A missed answer is often a matter of form (a model trained on another wording
            # starts its reply otherwise); teacher-forced, its tokens still depend on the
            # needle (second test bed: 50-67% of them are long-range), a signal its own
            # reply lacks.
            samples.append(_sample(p.ids, p.answer, answered=False))
        else:
            samples.append(_sample(p.ids, responses[i], p.scored, answered))
    return samples


def _answered(tokenizer, answer: list[int] | None, response: list[int]) -> bool | None:
    """Whether ``response`` holds the task's ``answer`` (compared as text: a chat model may
    restate the question first, and may split the answer into other tokens)."""
    if answer is None:
        return None
    return tokenizer.decode(answer).strip() in tokenizer.decode(response)


def _chat_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt and response ids, through the chat template when the tokenizer has one."""
    if not getattr(tokenizer, "chat_template", None):
        return bos_ids(tokenizer) + encode(tokenizer, prompt), encode(tokenizer, response)
    user = [{"role": "user", "content": prompt}]
    turn = [*user, {"role": "assistant", "content": response}]
    prompt_ids = list(
        tokenizer.apply_chat_template(
            user, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    full = list(tokenizer.apply_chat_template(turn, tokenize=True, return_dict=False))
    if full[: len(prompt_ids)] != prompt_ids:  # templates that rewrite earlier turns
        return prompt_ids, encode(tokenizer, response)
    return prompt_ids, full[len(prompt_ids) :]


def _fit(prompt: list[int], response: list[int], length: int) -> tuple[list[int], list[int]]:
    """Cut a pair to at most ``length`` tokens: the response keeps at most half (its start),
    the prompt loses its middle, so the instruction at its start and the question at its end
    both stay."""
    if len(prompt) + len(response) <= length:
        return prompt, response
    response = response[: max(length // 2, length - len(prompt))]
    room = length - len(response)
    head = room // 2
    return prompt[:head] + prompt[len(prompt) - (room - head) :], response


def _jsonl_pairs(path: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Prompt and response ids of every record of a JSONL file (through the chat template
    when the tokenizer has one)."""
    try:
        with path.open(encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    pairs = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt, response = record["prompt"], record["response"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object with string fields "
                '"prompt" and "response"'
            ) from None
        if not isinstance(prompt, str) or not isinstance(response, str) or not response:
            raise DataError(f"{path}:{lineno}: prompt and response must be non-empty strings")
        pairs.append(_chat_pair(tokenizer, prompt, response))
    return pairs


def _load_jsonl(path: Path, tokenizer, length: int, limit: int | None) -> list[CalibrationSample]:
    pairs = _jsonl_pairs(path, tokenizer)[:limit]
    return [_sample(*_fit(prompt, response, length)) for prompt, response in pairs]


def _load_text(path: Path, tokenizer, length: int, limit: int | None) -> list[CalibrationSample]:
    """Consecutive windows of ``length`` tokens (bos + text); a short tail is dropped."""
    ids = encode(tokenizer, path.read_text(encoding="utf-8", errors="replace"))
    bos = bos_ids(tokenizer)
    step = length - len(bos)
    count = len(ids) // step if limit is None else min(limit, len(ids) // step)
    return [_sample(bos, ids[i * step : (i + 1) * step]) for i in range(count)]


def load_calibration(
    path: str | os.PathLike, tokenizer, length: int, n_samples: int | None = None
) -> list[CalibrationSample]:
    """Read user calibration data: ``.jsonl`` lines ``{"prompt": ..., "response": ...}``
    (the loss is taken on the response; pairs longer than ``length`` are cut), or any other
    file as plain UTF-8 text cut into windows of ``length`` tokens (the loss is taken on
    every token).  ``n_samples`` keeps the first that many (None: all)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no calibration file at {path}")
    if length < 2:
        raise DataError(f"calibration length must be at least 2 tokens, got {length}")
    loader = _load_jsonl if path.suffix == ".jsonl" else _load_text
    samples = loader(path, tokenizer, length, n_samples)
    if not samples:
        raise DataError(f"{path} holds no calibration sample of up to {length} tokens")
    return samples


# A JSONL record serves a length N when it has between (1 - LENGTH_TOLERANCE) * N and N tokens.
LENGTH_TOLERANCE = 0.25


class CalibrationFile:
    """User calibration data for a search, read once, with profiling and held-out samples
    disjoint by construction.

    JSONL records are never cut (a cut could go through the needle): each serves the
    smallest of ``lengths`` it fits within :data:`LENGTH_TOLERANCE`, and a record longer
    than every length or shorter than its bucket is left out.  Profiling samples are a
    bucket's first records, held-out samples its last ones.  A plain text file is cut into
    windows of each length: profiling windows from its start, held-out windows from its end.
    Asking for samples that would overlap raises :class:`DataError`.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, lengths: list[int]) -> None:
        self.path, self.tokenizer = Path(path), tokenizer
        if not self.path.is_file():
            raise DataError(f"no calibration file at {self.path}")
        self.lengths = sorted(set(lengths))
        self.jsonl = self.path.suffix == ".jsonl"
        self.buckets: dict[int, list[tuple[list[int], list[int]]]] = {n: [] for n in self.lengths}
        self.left_out = 0
        if self.jsonl:
            for prompt, response in _jsonl_pairs(self.path, tokenizer):
                size = len(prompt) + len(response)
                home = next((n for n in self.lengths if size <= n), None)
                if home is None or size <= (1 - LENGTH_TOLERANCE) * home:
                    self.left_out += 1
                else:
                    self.buckets[home].append((prompt, response))
        else:
            self.ids = encode(tokenizer, self.path.read_text(encoding="utf-8", errors="replace"))
        self.taken: dict[tuple[int, bool], int] = {}  # (bucket or 0 for text, held out) -> count

    def _check(self, key: tuple[int, bool], count: int, available: int, what: str) -> None:
        other = self.taken.get((key[0], not key[1]), 0)
        if count + other > available:
            raise DataError(
                f"{self.path} has {available} {what}; {count} are needed here and {other} "
                f"are already used for {'profiling' if key[1] else 'validation'} (profiling "
                "and held-out samples must not overlap): give more data, or fewer --samples "
                "/ --validation-samples")
        self.taken[key] = max(self.taken.get(key, 0), count)

    def samples(self, length: int, count: int, held_out: bool) -> list[CalibrationSample]:
        """``count`` samples of (up to) ``length`` tokens, from the profiling or held-out
        side."""
        if self.jsonl:
            bucket = self.buckets.get(length)
            if bucket is None:
                raise DataError(f"length {length} was not among the lengths {self.lengths} "
                                "this calibration file was bucketed for")
            low = int((1 - LENGTH_TOLERANCE) * length) + 1
            self._check((length, held_out), count, len(bucket),
                        f"records of {low} to {length} tokens ({self.left_out} of other lengths "
                        "left out)")
            chosen = bucket[len(bucket) - count:][::-1] if held_out else bucket[:count]
            return [_sample(p, r) for p, r in chosen]
        bos = bos_ids(self.tokenizer)
        step = length - len(bos)
        windows = len(self.ids) // step
        # Profiling windows of every length start at token 0, held-out ones end at the last
        # token; counting tokens keeps the two sides apart across lengths.
        need = count * step
        self._check((0, held_out), need, len(self.ids), "tokens of text")
        starts = ([len(self.ids) - (i + 1) * step for i in range(count)] if held_out
                  else [i * step for i in range(min(count, windows))])
        return [_sample(bos, self.ids[s:s + step]) for s in starts]


def sample_source(model, tokenizer, data: str | os.PathLike | None, lengths: list[int],
                  seed: int = 0, wordings: tuple[str, ...] = CALIBRATION_PHRASINGS
                  ) -> Callable[[int, int, bool], list[CalibrationSample]]:
    """``(length, count, held_out) -> samples``, what search draws its profiling and held-out
    samples from: the file ``data`` bucketed by ``lengths`` (:class:`CalibrationFile`), or,
    without one, the model's own completions in ``wordings`` (:func:`model_calibration`),
    held-out samples from a seed of their own (search checks the two sides are disjoint)."""
    if data:
        return CalibrationFile(data, tokenizer, lengths).samples

    def source(length: int, count: int, held_out: bool) -> list[CalibrationSample]:
        return model_calibration(model, tokenizer, length, count,
                                 seed=seed + HELD_OUT_SEED_OFFSET * int(held_out),
                                 wordings=wordings)
    return source
