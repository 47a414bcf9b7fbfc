"""What every kernel file shares: the base-2 softmax constant, the score-buffer bound of the
torch versions, and the one switch between a Triton kernel and its torch version."""

from __future__ import annotations

import torch

from moaplan.errors import ModelError

# The kernels run their softmax in base 2 (exp2 is one instruction): scores are scaled by
# log2(e) once, and log-sum-exps come back in base 2.
LOG2E = 1.4426950408889634
# Upper bound on the float score elements a torch version holds at once (heads x query chunk x
# keys): 2^25 float32 scores are 128 MiB, enough for Nk = 4096 with 32 query heads at 256
# queries a chunk.
SCORE_ELEMENTS = 1 << 25
BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether a kernel file runs its Triton kernel on ``x`` (else its torch version):
    ``"triton"`` always (on the CPU that is the ``TRITON_INTERPRET=1`` test path),
    ``"torch"`` never, ``"auto"`` on CUDA tensors."""
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)
