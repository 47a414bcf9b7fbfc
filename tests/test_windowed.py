"""The windowed torch attention (the CPU path of a plan) equals the reference attention."""

import pytest
import torch

from moaplan.kernels.prefill import reference_attention
from moaplan.runtime.windowed import QUERY_BLOCK, windowed_attention


@pytest.mark.parametrize("nq_from_end", [None, 1, 37, QUERY_BLOCK + 3])
@pytest.mark.parametrize("rules", [
    ([64, 0, 16, 64], [10_000, 300, 17, 1000]),  # full, window, tiny window, sinks + window
    ([0, 0, 0, 0], [1, 1, 1, 1]),                # each query sees itself only
])
def test_windowed_equals_reference(nq_from_end, rules):
    torch.manual_seed(0)
    batch, hq, hkv, n, dim = 2, 8, 4, 2 * QUERY_BLOCK + 77, 16
    q = torch.randn(batch, hq, n, dim, dtype=torch.float64)
    k = torch.randn(batch, hkv, n, dim, dtype=torch.float64)
    v = torch.randn(batch, hkv, n, dim, dtype=torch.float64)
    sink, span = (torch.tensor(x) for x in rules)
    nq = n if nq_from_end is None else nq_from_end
    args = (q[:, :, n - nq:], k, v, sink, span)
    expected = reference_attention(*args, scale=0.3, q_offset=n - nq)
    got = windowed_attention(*args, scale=0.3, q_offset=n - nq)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
