"""Triton kernels that execute moaplan plans (installed as ``moaplan.kernels``)."""

from moaplan.kernels.append import append_token  # noqa: F401
from moaplan.kernels.decode import decode_attention  # noqa: F401
from moaplan.kernels.influence import influence_summary  # noqa: F401
from moaplan.kernels.layout import RuleTable, decode_layout  # noqa: F401
from moaplan.kernels.prefill import PrefillConfig, sparse_attention  # noqa: F401
