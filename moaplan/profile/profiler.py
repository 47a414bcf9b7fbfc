"""Running the profile: dense forward, response-token objective, one backward per sample.

For each length N and each of its calibration samples (N tokens, or fewer: a shorter sample's
summary fills the first block distances) the model runs densely through
:class:`~moaplan.profile.attention.InfluenceCollector`; the loss is the mean objective (see
:data:`OBJECTIVES`) on the response tokens only (the LM head is applied to those positions
alone, a chunk at a time, so ``[N, vocab]`` logits never exist), and one backward pass with
frozen weights (only the input embeddings require a gradient) fills the per-layer summaries,
each on its layer's device (a model placed over several GPUs included) and gathered on the
CPU.  After each finished sample the partial profile is checkpointed atomically, so an
interrupted run resumes from the last finished sample.  Under ``torchrun`` (an initialised
``torch.distributed``) rank ``r`` takes samples ``r, r + world, ...`` and the summaries are
all-reduced at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from moaplan.errors import DataError, ProfileError
from moaplan.profile.attention import InfluenceCollector, profiling_attention
from moaplan.profile.record import (
    BLOCK,
    Profile,
    load_profile,
    metadata_path,
    save_profile,
    sink_blocks,
)
from moaplan.rules import RuleSpace
from moaplan.shape import ModelShape


class Sample(Protocol):
    """A calibration sample (``moaplan.data.CalibrationSample``): ``[N]`` ids and a bool mask
    of the response tokens the loss is taken on."""

    input_ids: torch.Tensor
    response_mask: torch.Tensor


@dataclass(frozen=True)
class Progress:
    """What the progress callback is told after each finished sample."""

    length: int
    sample: int
    tokens: int
    seconds: float


def calibration_hash(samples: Mapping[int, Sequence[Sample]]) -> str:
    """sha256 (16 hex digits) of every sample's ids and response mask, by length."""
    digest = hashlib.sha256()
    for n in sorted(samples):
        for s in samples[n]:
            digest.update(np.asarray(s.input_ids.cpu(), dtype=np.int64).tobytes())
            digest.update(np.asarray(s.response_mask.cpu(), dtype=bool).tobytes())
    return digest.hexdigest()[:16]


def _check_samples(samples: Mapping[int, Sequence[Sample]]) -> None:
    for n, group in samples.items():
        if not group:
            raise DataError(f"no calibration samples of length {n}")
        for s in group:
            size = s.input_ids.shape[0] if s.input_ids.dim() == 1 else -1
            if not 2 <= size <= n or s.response_mask.shape != s.input_ids.shape:
                raise DataError(f"a sample filed under length {n} has shape "
                                f"{tuple(s.input_ids.shape)}; expected (N,) with 2 <= N <= {n}")
            if not bool(s.response_mask[1:].any()):
                raise DataError(f"a sample of length {n} has no response tokens to take the "
                                "loss on")


# What the profile differentiates, per response token t with logits z:
#   "cross_entropy": -log p_t, the model's loss.  Its gradient, (1 - p_t) in size, vanishes on
#                    tokens the model is sure of, e.g. a retrieved pass key, so the heads that
#                    retrieve it look free to restrict.
#   "log_odds":      -log(p_t / (1 - p_t)) = logsumexp_{k != t} z_k - z_t.  Its gradient has
#                    size 1 at any confidence, so a confident answer still tells which
#                    entries it depends on.
OBJECTIVES = ("log_odds", "cross_entropy")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ProfileError(f"unknown profiling objective {objective!r}; choose one of "
                           f"{', '.join(OBJECTIVES)}")


def token_objective(logits: torch.Tensor, targets: torch.Tensor, objective: str) -> torch.Tensor:
    """Mean of ``objective`` (one of :data:`OBJECTIVES`) over rows of ``logits [T, vocab]``."""
    check_objective(objective)
    if objective == "cross_entropy":
        return torch.nn.functional.cross_entropy(logits, targets)
    log_p = logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=1)
    # log(1 - p) = log(-expm1(log p)), without a second [T, vocab] tensor.  log p is held just
    # below 0, so a token the model is certain of (p rounds to 1) keeps a finite log-odds.
    log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-6)))
    return (log_not_p - log_p).mean()


def response_loss(model: torch.nn.Module, sample: Sample, objective: str = "cross_entropy"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, embeddings)``: the mean ``objective`` on the response tokens, and the input
    embeddings (a leaf requiring grad, so the graph exists although the weights are frozen)."""
    embed = model.get_input_embeddings()
    ids = sample.input_ids.to(embed.weight.device)[None]
    embeds = embed(ids).detach().requires_grad_(True)
    hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    # Position t predicts token t + 1; keep the positions whose next token is a response token.
    positions = sample.response_mask[1:].nonzero().squeeze(1).to(hidden.device)
    head = model.get_output_embeddings()
    targets = ids[0, 1:][positions.to(ids.device)].to(head.weight.device)
    return _head_objective(head, hidden[0, positions], targets, objective), embeds


# float32 logits made at once by the LM head: 2^27 elements, 512 MiB (4096 response tokens of
# a 32K vocabulary, 1046 of a 128K one).  All of a long answer's logits at once would be
# [tokens, vocab]: 16 GB for 32K tokens of a 128K vocabulary.
_HEAD_ELEMENTS = 1 << 27


def head_rows(vocab: int) -> int:
    """Response tokens whose logits the LM head computes at once."""
    return max(1, _HEAD_ELEMENTS // vocab)


def _objective_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   objective: str) -> torch.Tensor:
    logits = head(hidden.to(head.weight.device)).float()
    return token_objective(logits, targets, objective) * len(targets)


def _head_objective(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    objective: str) -> torch.Tensor:
    """The mean ``objective`` of the LM head's logits on the rows of ``hidden [T, h]``, a
    chunk of :func:`head_rows` rows at a time; under autograd each chunk's logits are made
    again in the backward pass (activation checkpointing), so one chunk's exist at a time."""
    rows = head_rows(head.weight.shape[0])
    if len(targets) <= rows:
        return token_objective(head(hidden.to(head.weight.device)).float(), targets, objective)
    total = hidden.new_zeros((), dtype=torch.float32, device=head.weight.device)
    for start in range(0, len(targets), rows):
        chunk = (head, hidden[start:start + rows], targets[start:start + rows], objective)
        total = total + (torch.utils.checkpoint.checkpoint(_objective_sum, *chunk,
                                                           use_reentrant=False)
                         if torch.is_grad_enabled() else _objective_sum(*chunk))
    return total / len(targets)


@torch.no_grad()
def response_losses(model: torch.nn.Module, samples: Sequence[Sample],
                    on_sample: Callable[[], None] | None = None) -> list[float]:
    """Each sample's mean response-token cross-entropy with the model as it is now (called
    back after each sample)."""
    losses = []
    for sample in samples:
        losses.append(float(response_loss(model, sample)[0]))
        if on_sample is not None:
            on_sample()
    return losses


def _set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    # transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*.
    prefix = ("activation" if hasattr(model, "activation_checkpointing_enable") else "gradient")
    getattr(model, f"{prefix}_checkpointing_{'enable' if on else 'disable'}")()


@contextlib.contextmanager
def _profiling_mode(model: torch.nn.Module, gradient_checkpointing: bool) -> Iterator[None]:
    """Frozen weights; with checkpointing, the train mode transformers needs to checkpoint."""
    grads = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.requires_grad_(False)
    if gradient_checkpointing:
        # transformers checkpoints a layer only in train mode; attention dropout is ignored
        # by the profiling attention, which always computes the exact dense attention.
        _set_checkpointing(model, True)
        model.train()
    else:
        model.eval()
    try:
        yield
    finally:
        if gradient_checkpointing:
            _set_checkpointing(model, False)
        model.train(was_training)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def checkpoint_path(out: str | Path, rank: int = 0, world: int = 1) -> Path:
    """Where the partial profile of ``out`` (per rank under torchrun) is checkpointed."""
    out = Path(out)
    suffix = ".partial" if world == 1 else f".partial-rank{rank}"
    return out.with_name(out.stem + suffix + out.suffix)


def remove_checkpoint(out: str | Path, rank: int = 0, world: int = 1) -> None:
    """Delete the checkpoint of ``out`` (tensors and metadata), once the profile is saved."""
    partial = checkpoint_path(out, rank, world)
    for leftover in (partial, metadata_path(partial)):
        leftover.unlink(missing_ok=True)


def _start(model_shape: ModelShape, lengths: list[int], counts: dict[int, int], block: int,
           rule_space: RuleSpace, data_hash: str, objective: str,
           resume_from: Path | None) -> Profile:
    fresh = Profile(model=model_shape, block=block, lengths=lengths, samples=counts,
                    rule_space=rule_space, data_hash=data_hash, objective=objective)
    if resume_from is None or not resume_from.is_file():
        return fresh
    old = load_profile(resume_from)
    old.check_shape(model_shape)
    if (old.block, old.lengths, old.data_hash, old.rule_space, old.objective) != (
            block, lengths, data_hash, rule_space, objective):
        raise ProfileError(f"{resume_from} was started with other settings (block, lengths, "
                           "calibration data, rule space or objective); delete it or rerun "
                           "with the same arguments")
    old.samples = counts
    return old


def _all_reduce(profile: Profile, device: torch.device) -> None:
    # A rank that resumed an older checkpoint has no query heads' summaries: then none keeps
    # them (a partial sum would misprice the query heads).
    has_query = torch.tensor([int(profile.has_query_heads)], device=device)
    dist.all_reduce(has_query, op=dist.ReduceOp.MIN)
    if not has_query.item():
        profile.query_far_sum.clear()
        profile.query_sink_sum.clear()
    sums_of = [profile.far_sum, profile.sink_sum]
    if profile.has_query_heads:
        sums_of += [profile.query_far_sum, profile.query_sink_sum]
    for n in profile.lengths:
        for sums in sums_of:
            t = torch.from_numpy(sums[n]).to(device)
            dist.all_reduce(t)
            sums[n] = t.cpu().numpy()
        count = torch.tensor([profile.finished[n]], device=device)
        dist.all_reduce(count)
        profile.finished[n] = int(count.item())


def profile_model(
    model: torch.nn.Module,
    samples: Mapping[int, Sequence[Sample]],
    *,
    block: int = BLOCK,
    rule_space: RuleSpace | None = None,
    backend: str = "auto",
    gradient_checkpointing: bool = False,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    on_sample: Callable[[Progress], None] | None = None,
    objective: str = "log_odds",
) -> Profile:
    """Profile ``model`` (a loaded ``transformers`` causal LM, any device map) on ``samples``
    (length -> samples of that length).

    With ``checkpoint`` the partial sums are saved there after every sample (per rank under
    torchrun, see :func:`checkpoint_path`); with ``resume`` a checkpoint found there is
    continued (it must be for this model, these settings and this data).  The returned profile
    is complete and, under torchrun, the same on every rank.  ``objective`` is what is
    differentiated on the response tokens (:data:`OBJECTIVES`; the default, ``"log_odds"``,
    does not vanish on confidently retrieved answers).
    """
    rule_space = rule_space or RuleSpace()
    num_sink = sink_blocks(rule_space, block)
    _check_samples(samples)
    lengths = sorted(samples)
    counts = {n: len(samples[n]) for n in lengths}
    rank, world = _rank_world()
    ckpt = checkpoint_path(checkpoint, rank, world) if checkpoint else None
    check_objective(objective)  # before any sample is profiled
    profile = _start(ModelShape.from_config(model.config), lengths, counts, block, rule_space,
                     calibration_hash(samples), objective, ckpt if resume else None)
    own = {n: list(range(rank, counts[n], world)) for n in lengths}
    if any(profile.finished[n] > len(own[n]) for n in lengths):
        raise ProfileError(f"{ckpt} holds more samples than this run has; delete it")

    collector = InfluenceCollector(block=block, num_sink_blocks=num_sink, backend=backend)
    with _profiling_mode(model, gradient_checkpointing), profiling_attention(model, collector):
        for n in lengths:
            for index in own[n][profile.finished[n]:]:
                start = time.perf_counter()
                collector.reset()
                sample = samples[n][index]
                loss, embeds = response_loss(model, sample, objective)
                torch.autograd.grad(loss, embeds)
                far, sink = _stack(collector, model.config.num_hidden_layers,
                                   profile.far_sum[n].shape[1])
                profile.add(n, far, sink, per_query_head=True)
                if ckpt is not None:
                    save_profile(profile, ckpt)
                if on_sample is not None:
                    on_sample(Progress(n, index, len(sample.input_ids),
                                       time.perf_counter() - start))
    if world > 1:
        device = next(model.parameters()).device
        _all_reduce(profile, device if dist.get_backend() == "nccl" else torch.device("cpu"))
    return profile


def _stack(collector: InfluenceCollector, num_layers: int, num_blocks: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """The per-layer summaries of one sample as layer-major float64 arrays, one row per query
    head, zero-padded to ``num_blocks`` block distances (a sample may be shorter than its
    length)."""
    missing = [i for i in range(num_layers) if i not in collector.summaries]
    if missing:
        raise ProfileError(f"layers {missing} produced no attention gradient (is the model's "
                           "attention implementation switchable through AttentionInterface?)")
    layers = [collector.summaries[i] for i in range(num_layers)]
    far = torch.cat([s.far.double().cpu() for s in layers])
    sink = torch.cat([s.sink.double().cpu() for s in layers])
    pad = num_blocks - far.shape[1]
    return (torch.nn.functional.pad(far, (0, 0, 0, pad)).numpy(),
            torch.nn.functional.pad(sink, (0, 0, 0, pad)).numpy())


def profile_to_file(model: torch.nn.Module, samples: Mapping[int, Sequence[Sample]],
                    out: str | Path, *, resume: bool = True, **settings: Any) -> Profile:
    """:func:`profile_model` (``settings`` are its keywords), checkpointing beside ``out`` so
    that an interrupted run resumes, then the profile saved at ``out`` and the checkpoint
    deleted.  Under torchrun each rank profiles its share and rank 0 writes the file; every
    rank gets the all-reduced profile."""
    rank, world = _rank_world()
    profile = profile_model(model, samples, checkpoint=out, resume=resume, **settings)
    if rank == 0:
        save_profile(profile, out)
    remove_checkpoint(out, rank, world)
    return profile
