"""``moaplan profile`` as one library call: output naming, torchrun ranks, layout, loading,
calibration samples, the profile (or a head scorer's) and its file.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs :func:`run_profile_job`: it joins the
process group, places its model on its own GPUs (:mod:`moaplan.profile.layout`), profiles
samples ``rank, rank + world, ...`` with a checkpoint of its own, and rank 0 writes the
all-reduced profile.  One process with the model's layers over several GPUs is the same call
without torchrun.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moaplan.data.calibration import sample_source
from moaplan.errors import ProfileError
from moaplan.model.loading import ModelSource
from moaplan.profile.layout import Layout, load_laid_out
from moaplan.profile.profiler import Progress, checkpoint_path, profile_to_file
from moaplan.profile.record import (
    BLOCK,
    Profile,
    check_profile_output,
    default_profile_path,
    save_profile,
    sink_blocks,
)
from moaplan.profile.scorers import score_profile
from moaplan.rules import RuleSpace
from moaplan.shape import ModelShape


@dataclass(frozen=True)
class ProfileJob:
    """What ``moaplan profile`` is asked: the model, its samples, the profile's settings and
    where the model runs (``device``, ``gpus_per_model``: :func:`~moaplan.profile.layout.
    choose_layout`; ``dtype`` None: bfloat16 on GPUs, float32 on the CPU).  ``out`` None is
    the default profile path, where ``search`` looks."""

    source: ModelSource
    lengths: list[int]
    samples: int
    scorer: str = "gradient"
    out: Path | None = None
    data: str | None = None
    seed: int = 0
    block: int = BLOCK
    objective: str = "log_odds"
    resume: bool = False
    backend: str = "auto"
    checkpointing: bool = False
    device: str = "auto"
    dtype: torch.dtype | None = None
    gpus_per_model: int | None = None
    rule_space: RuleSpace = field(default_factory=RuleSpace)


@dataclass(frozen=True)
class Ranks:
    """This process's place under torchrun (all 0 / 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_environment(cls) -> Ranks:
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", str(world))))


@dataclass(frozen=True)
class JobStart:
    """Told once the model is loaded: this rank, how many samples (or scorer inputs) it runs,
    and the layout it runs them in."""

    ranks: Ranks
    total: int
    layout: Layout


@dataclass(frozen=True)
class JobResult:
    path: Path
    profile: Profile
    ranks: Ranks


@contextlib.contextmanager
def _process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """The torchrun process group, joined (NCCL on this rank's first GPU, else gloo) for the
    block and left after it, unless there is none or the caller already joined one."""
    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_profile_job(job: ProfileJob, config: Any, *,
                    on_start: Callable[[JobStart], None] | None = None,
                    on_sample: Callable[[Progress], None] | None = None) -> JobResult:
    """Run ``job`` on the model whose (already checked) config is ``config``: the output
    paths are checked before any weight loads; the profile is checkpointed after every
    sample (``job.resume`` continues it) and the checkpoint removed once the profile is
    written."""
    ranks = Ranks.from_environment()
    out = check_profile_output(job.out or default_profile_path(ModelShape.from_config(config),
                                                               job.scorer))
    if job.scorer != "gradient" and (ranks.world > 1 or job.data or job.resume):
        raise ProfileError(f"--scorer {job.scorer} builds its own inputs and runs in one "
                           "process: drop --data, --resume and torchrun")
    sink_blocks(job.rule_space, job.block)  # the rule space is priceable: fail before loading
    check_profile_output(checkpoint_path(out, ranks.rank, ranks.world))
    model, tokenizer, layout = load_laid_out(
        job.source, config, job.lengths, job.dtype, device=job.device,
        gpus_per_model=job.gpus_per_model, checkpointing=job.checkpointing,
        local_rank=ranks.local_rank, local_world=ranks.local_world)
    if job.scorer != "gradient":
        if on_start is not None:
            on_start(JobStart(ranks, job.samples * len(set(job.lengths)), layout))
        profile = score_profile(model, tokenizer, job.scorer, job.lengths, job.samples,
                                block=job.block, rule_space=job.rule_space, seed=job.seed,
                                on_sample=on_sample)
        save_profile(profile, out)
        return JobResult(out, profile, ranks)
    with _process_group(ranks, layout.devices[0]):
        # search's own source of profiling samples, so that search finds this profile's data
        source = sample_source(model, tokenizer, job.data, job.lengths, job.seed)
        samples = {n: source(n, job.samples, False) for n in job.lengths}
        if on_start is not None:
            on_start(JobStart(ranks, sum(len(range(ranks.rank, len(s), ranks.world))
                                         for s in samples.values()), layout))
        profile = profile_to_file(model, samples, out, resume=job.resume, block=job.block,
                                  rule_space=job.rule_space, backend=job.backend,
                                  objective=job.objective,
                                  gradient_checkpointing=layout.checkpointing,
                                  on_sample=on_sample)
    return JobResult(out, profile, ranks)
