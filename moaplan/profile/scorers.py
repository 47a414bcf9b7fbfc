"""Head scorers beside the gradient profiler: retrieval, echo and induction scores.

- **Retrieval score** (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
  Factuality"): on needle-in-a-haystack prompts (the passkey and key-value tasks of
  :mod:`moaplan.data.tasks`, in turn, needles spread evenly over depths), at each step that
  produces an answer token a query head *copies* when its most-attended key lies inside the
  asked needle and holds the token being generated.  The generated token is the model's argmax
  given the true prefix, i.e. what greedy decoding emits while it is right (the convention of
  :mod:`moaplan.eval.scoring`).  A head's score is the fraction of the answer's tokens it copies,
  averaged over samples (the answer is the needle's value, so this is Wu et al.'s
  ``|copied ∩ needle| / |needle|`` with the needle being what must be copied).
- **Echo and induction scores** (RazorAttention): on ``bos + x + x`` with ``x`` ``L`` random
  tokens, the mean attention mass a query at position ``i`` of the second copy puts on the same
  token's earlier occurrence ``i - L`` (echo) and on the token right after it ``i - L + 1``
  (induction).

Both are measured per (layer, query head) and reduced to KV heads by the **max** over the GQA
group: a KV head's cache is shared by its query heads, so one query head that retrieves needs
every key the KV head holds, however little its siblings retrieve; a sum would rank two weak
half-copiers above one perfect retriever.

Attention probabilities come from :class:`RowProbe`, an ``AttentionInterface`` function that
computes the layer's output with SDPA and, for the query rows being scored only (the answer
steps, or the second copy), the softmax rows slab by slab — never the ``N x N`` matrix.

**As a profile.**  :func:`score_profile` turns the scores into the optimizer's
:class:`~moaplan.profile.Profile`, so the knapsack consumes them unchanged: at each length,
KV head ``h`` gets the weight ``w_h = score_h + FLOOR * max score``, spread *uniformly* over its
causal entries ``j < i``.  A rule's dropped influence is then ``w_h`` times the share of entries
it drops, and the profile's total per head is ``w_h``.  Uniform, not where the scoring inputs
happened to put the needle or the earlier copy: the scores say *whether* a head retrieves or
copies, not from where — in real inputs the needle can be anywhere — so a high-scoring head
is costly to narrow at every distance and the optimizer keeps it wide, DuoAttention-style,
while the elastic rules spend what is left of the budget.  ``FLOOR`` (1% of the best score)
keeps the heads that never score from being free, so leftover budget still widens them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moaplan.data.corpus import stdlib_corpus
from moaplan.data.tasks import MIN_LENGTH, TASKS, TaskSample
from moaplan.data.tokens import bos_ids
from moaplan.errors import DataError, ProfileError
from moaplan.profile.attention import plain_causal_scale, profiling_attention
from moaplan.profile.influence import causal_scores, grouped_queries, rows_per_slab
from moaplan.profile.profiler import Progress
from moaplan.profile.record import BLOCK, Profile, num_blocks, sink_blocks
from moaplan.rules import RuleSpace
from moaplan.shape import ModelShape

SCORERS = ("retrieval", "induction")  # the head scorers `moaplan profile --scorer` offers
FLOOR = 0.01
RETRIEVAL_TASKS = ("passkey", "kv")

# (layer, first query row, probabilities [B, Hq, rows, keys] of rows first.. over keys 0..)
Observer = Callable[[int, int, torch.Tensor], None]


@dataclass
class RowProbe:
    """Dense causal attention that also hands the probabilities of query rows
    ``[start, end)`` to ``observe``, one slab of rows at a time (float32)."""

    start: int
    end: int
    observe: Observer

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: torch.Tensor | None,
                 scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
                 ) -> tuple[torch.Tensor, None]:
        scale = plain_causal_scale("head scoring", query, key, attention_mask, scaling, kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1])
        qg, _ = grouped_queries(query, key)
        kf = key.float()[:, :, None]
        b, hq, n, _ = query.shape
        rows = rows_per_slab(b, hq, n, 1)
        for r0 in range(self.start, self.end, rows):
            r1 = min(r0 + rows, self.end)
            probs = torch.softmax(causal_scores(qg, kf, r0, r1, scale), -1)
            self.observe(module.layer_idx, r0, probs.flatten(1, 2))
        return out.transpose(1, 2).contiguous(), None


def _run_probe(model: torch.nn.Module, ids: Sequence[int], probe: RowProbe,
               logits_to_keep: int = 1) -> torch.Tensor:
    """One forward pass of ``ids`` through ``probe``; the logits of the last positions."""
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode(), profiling_attention(model, probe):
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=False,
                    logits_to_keep=logits_to_keep)
    return out.logits[0]


def kv_head_max(scores: np.ndarray, kv_heads: int) -> np.ndarray:
    """``[layers, query heads] -> [layers, kv_heads]``: the max over each GQA group."""
    layers, heads = scores.shape
    return scores.reshape(layers, kv_heads, heads // kv_heads).max(-1)


def copy_hits(argmax: np.ndarray, generated: Sequence[int], ids: Sequence[int],
              needle: tuple[int, int]) -> np.ndarray:
    """Per head, how many steps it copies: ``argmax [..., steps]`` is each head's most-attended
    key at each answer step, ``generated [steps]`` the token each step produces, ``ids`` the
    input and ``needle`` the ``[start, end)`` span the answer must come from."""
    argmax = np.asarray(argmax)
    tokens = np.asarray(ids)[argmax]
    inside = (argmax >= needle[0]) & (argmax < needle[1])
    return (inside & (tokens == np.asarray(generated))).sum(-1)


def retrieval_prompts(tokenizer: Any, length: int, samples: int, seed: int = 0
                      ) -> list[TaskSample]:
    """``samples`` prompts of ``length`` tokens: passkey and key-value in turn (those that fit),
    needles at depths ``(k + 0.5) / samples`` so every region of the context is tested."""
    kinds = [k for k in RETRIEVAL_TASKS if length >= MIN_LENGTH[k]]
    if not kinds:
        raise DataError(f"length {length} is too short for a retrieval prompt; use at least "
                        f"{min(MIN_LENGTH[k] for k in RETRIEVAL_TASKS)} tokens")
    corpus = stdlib_corpus("train")
    rng = np.random.default_rng([seed, length])
    return [TASKS[kinds[k % len(kinds)]](tokenizer, corpus, length, (k + 0.5) / samples, rng)
            for k in range(samples)]


def retrieval_score(model: torch.nn.Module, prompt: TaskSample) -> np.ndarray:
    """Fraction of ``prompt``'s answer tokens each (layer, query head) copies from the needle:
    ``[layers, query heads]``."""
    config = model.config
    ids = prompt.input_ids
    first, steps = prompt.answer_start - 1, len(prompt.answer_ids)  # rows that emit the answer
    argmax = torch.zeros(config.num_hidden_layers, config.num_attention_heads, steps,
                         dtype=torch.long)

    def observe(layer: int, r0: int, probs: torch.Tensor) -> None:
        argmax[layer, :, r0 - first:r0 - first + probs.shape[2]] = probs[0].argmax(-1).cpu()

    logits = _run_probe(model, ids, RowProbe(first, first + steps, observe), steps + 1)
    generated = logits[:steps].argmax(-1).cpu().numpy()
    return copy_hits(argmax.numpy(), generated, ids, prompt.needle) / steps


@dataclass(frozen=True)
class RepeatedTokens:
    """``bos + x + x``: the input of the echo and induction scores, ``x`` ``half`` tokens."""

    input_ids: list[int]
    half: int


def repeated_tokens(vocab_size: int, length: int, rng: np.random.Generator,
                    bos: Sequence[int] = (), exclude: Sequence[int] = ()) -> RepeatedTokens:
    """``bos + x + x`` with ``x`` ``(length - len(bos)) // 2`` tokens drawn uniformly from the
    vocabulary without ``exclude`` (special tokens)."""
    pool = np.setdiff1d(np.arange(vocab_size), np.asarray(exclude, dtype=np.int64))
    half = (length - len(bos)) // 2
    if half < 2 or pool.size == 0:
        raise DataError(f"length {length} is too short for a repeated sequence")
    x = rng.choice(pool, size=half).tolist()
    return RepeatedTokens([*bos, *x, *x], half)


def copy_mass(probs: torch.Tensor, r0: int, half: int) -> torch.Tensor:
    """``[2, Hq]``: summed over batch and rows, the mass that rows ``r0..`` of ``probs``
    ``[B, Hq, rows, keys]`` put on the key ``half`` back (echo) and the one after it
    (induction)."""
    rows = torch.arange(r0, r0 + probs.shape[2], device=probs.device)
    earlier = (rows - half)[None, None, :, None].expand(*probs.shape[:3], 1)
    return torch.stack([probs.gather(-1, earlier).sum((0, 2, 3)),
                        probs.gather(-1, earlier + 1).sum((0, 2, 3))])


def echo_induction_score(model: torch.nn.Module, ids: Sequence[int], half: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(echo, induction)`` ``[layers, query heads]`` on ``ids`` whose last ``2 * half``
    tokens are one sequence twice: the mean mass the second copy's queries put on the earlier
    occurrence of their token and on the token after it."""
    config = model.config
    sums = torch.zeros(2, config.num_hidden_layers, config.num_attention_heads,
                       dtype=torch.float64)

    def observe(layer: int, r0: int, probs: torch.Tensor) -> None:
        sums[:, layer] += copy_mass(probs, r0, half).double().cpu()

    _run_probe(model, ids, RowProbe(len(ids) - half, len(ids), observe))
    echo, induction = (sums / half).numpy()
    return echo, induction


@dataclass
class HeadScores:
    """Per-length scores per (layer, KV head) of one scorer: ``scores[name][length]``
    ``[layers, kv_heads]``, means over ``samples[length]`` inputs; a profile weighs a head by
    the sum of its scores (``induction`` has two: echo and induction)."""

    scorer: str
    scores: dict[str, dict[int, np.ndarray]]
    samples: dict[int, int]
    inputs_hash: str

    def mean(self, name: str) -> np.ndarray:
        """Sample-weighted mean over lengths of ``scores[name]``: ``[layers, kv_heads]``."""
        total = sum(self.samples.values())
        return sum(self.scores[name][n] * c for n, c in self.samples.items()) / total


def _check_scorer(scorer: str) -> None:
    if scorer not in SCORERS:
        raise ProfileError(f"unknown head scorer {scorer!r}; choose one of "
                           f"{', '.join(SCORERS)} (or the gradient profiler)")


def _inputs(model: torch.nn.Module, tokenizer: Any, scorer: str, length: int, samples: int,
            seed: int) -> list[TaskSample] | list[RepeatedTokens]:
    if scorer == "retrieval":
        return retrieval_prompts(tokenizer, length, samples, seed)
    rng = np.random.default_rng([seed, length])
    return [repeated_tokens(model.config.vocab_size, length, rng, bos_ids(tokenizer),
                            tokenizer.all_special_ids) for _ in range(samples)]


def _score(model: torch.nn.Module, item: TaskSample | RepeatedTokens) -> dict[str, np.ndarray]:
    if isinstance(item, TaskSample):
        return {"retrieval": retrieval_score(model, item)}
    echo, induction = echo_induction_score(model, item.input_ids, item.half)
    return {"echo": echo, "induction": induction}


def head_scores(model: torch.nn.Module, tokenizer: Any, scorer: str, lengths: Sequence[int],
                samples: int, seed: int = 0,
                on_sample: Callable[[Progress], None] | None = None) -> HeadScores:
    """Run ``scorer`` ("retrieval" or "induction") on ``samples`` inputs of each length."""
    _check_scorer(scorer)
    config = model.config
    # RazorAttention keeps both echo and induction heads: their masses sit on distinct entries
    # of the same rows, so the "induction" profile weighs a head by their sum.
    names = ("retrieval",) if scorer == "retrieval" else ("echo", "induction")
    lengths = sorted(set(lengths))
    scores: dict[str, dict[int, np.ndarray]] = {name: {} for name in names}
    digest = hashlib.sha256(scorer.encode())
    for n in lengths:
        sums = {name: np.zeros((config.num_hidden_layers, config.num_attention_heads))
                for name in names}
        for index, item in enumerate(_inputs(model, tokenizer, scorer, n, samples, seed)):
            start = time.perf_counter()
            digest.update(np.asarray(item.input_ids, dtype=np.int64).tobytes())
            for name, value in _score(model, item).items():
                sums[name] += value
            if on_sample is not None:
                on_sample(Progress(n, index, len(item.input_ids), time.perf_counter() - start))
        for name in names:
            scores[name][n] = kv_head_max(sums[name] / samples, config.num_key_value_heads)
    return HeadScores(scorer, scores, dict.fromkeys(lengths, samples), digest.hexdigest()[:16])


def entry_counts(length: int, block: int, num_sink_blocks: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """How many causal entries ``j < i`` of a ``length``-token input fall in each cell of the
    profile summary (see :mod:`moaplan.profile`): ``(far [nblk, 2], sink [K, nblk, 2])``."""
    nblk = num_blocks(length, block)
    rows = np.full(nblk, block, dtype=np.float64)
    rows[-1] = length - (nblk - 1) * block  # the last query block may be partial
    # Query block qb against an earlier (full) key block: part 0 is r >= c, part 1 the rest.
    lower = rows * (rows + 1) / 2
    earlier = np.stack([lower, rows * block - lower], -1)  # [qb, 2]
    diagonal = np.stack([rows * (rows - 1) / 2, np.zeros(nblk)], -1)  # j < i within a block
    far = np.zeros((nblk, 2))
    far[0] = diagonal.sum(0)
    far[1:] = np.cumsum(earlier[::-1], 0)[::-1][1:]  # delta >= 1: query blocks qb >= delta
    sink = np.zeros((num_sink_blocks, nblk, 2))
    for k in range(min(num_sink_blocks, nblk)):
        sink[k, 0] = diagonal[k]
        sink[k, 1:nblk - k] = earlier[k + 1:]  # query block k + delta against key block k
    return far, sink


def profile_from_scores(shape: ModelShape, scores: HeadScores, *, block: int = BLOCK,
                        rule_space: RuleSpace | None = None) -> Profile:
    """The optimizer's profile of ``scores``: per length, each KV head's weight (the sum of its
    scores, plus ``FLOOR`` times the best head's) spread uniformly over its entries ``j < i``."""
    rule_space = rule_space or RuleSpace()
    num_sink = sink_blocks(rule_space, block)
    lengths = sorted(scores.samples)
    profile = Profile(model=shape, block=block, lengths=lengths, samples=dict(scores.samples),
                      rule_space=rule_space, data_hash=scores.inputs_hash,
                      scorer=scores.scorer,
                      head_scores={name: scores.mean(name).tolist() for name in scores.scores})
    for n in lengths:
        weight = sum(per_length[n] for per_length in scores.scores.values()).reshape(-1)
        weight = weight + FLOOR * max(float(weight.max()), 1e-12)
        far, sink = entry_counts(n, block, num_sink)
        total = n * (n - 1) / 2
        count = scores.samples[n]  # the profile holds sums over samples
        profile.add(n, weight[:, None, None] * far * count / total,
                    weight[:, None, None, None] * sink * count / total, count)
    return profile


def score_profile(model: torch.nn.Module, tokenizer: Any, scorer: str, lengths: Sequence[int],
                  samples: int, *, block: int = BLOCK, rule_space: RuleSpace | None = None,
                  seed: int = 0, on_sample: Callable[[Progress], None] | None = None
                  ) -> Profile:
    """Score ``model``'s heads with ``scorer`` and return them as a profile (see the module
    docstring for the mapping)."""
    _check_scorer(scorer)
    rule_space = rule_space or RuleSpace()
    sink_blocks(rule_space, block)  # refuse an unpriceable rule space before any forward pass
    scores = head_scores(model, tokenizer, scorer, lengths, samples, seed, on_sample)
    return profile_from_scores(ModelShape.from_config(model.config), scores, block=block,
                               rule_space=rule_space)
