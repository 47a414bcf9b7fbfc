"""Scoring with one forward pass per batch, through whatever attention the model is set to.

An answer counts as correct when, with the true prefix given, the model's top token is the
true token at every answer position.  That is exactly the condition under which greedy
decoding would produce the answer, without a decode loop or KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moaplan.data.tasks import TaskSample
from moaplan.data.tokens import batches


@torch.inference_mode()
def answers_correct(model, samples: Sequence[TaskSample], batch_size: int = 8) -> list[bool]:
    """Whether greedy decoding would reproduce each sample's answer (samples of equal length)."""
    correct: list[bool] = []
    for batch in batches(samples, batch_size):
        ids = torch.tensor([s.input_ids for s in batch], device=model.device)
        n = ids.shape[1]
        keep = max(n - s.answer_start for s in batch) + 1
        logits = model(input_ids=ids, logits_to_keep=keep).logits  # positions n-keep .. n-1
        predicted = logits.argmax(-1)
        for row, s in enumerate(batch):
            # the token at position p is predicted at position p - 1, i.e. kept index p-1-(n-keep)
            first = s.answer_start - 1 - (n - keep)
            guess = predicted[row, first : first + len(s.answer_ids)]
            correct.append(guess.tolist() == s.answer_ids)
    return correct


@torch.inference_mode()
def token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of tokens 1.. of each row of ``ids`` ``[B, N]`` -> ``[B]``."""
    logits = model(input_ids=ids.to(model.device)).logits[:, :-1].float()
    targets = ids[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll.sum(dim=1).cpu()
