"""Triton kernels that execute moaplan plans (installed as ``moaplan.kernels``)."""
