"""The profiler: gradient-based attention influence per (layer, KV head), blockwise.

Influence (first order, from MoA): ``E_ij = -A_ij (G_ij - D_i) / (1 - A_ij + eps)`` with
``G_ij = dO_i . v_j`` and ``D_i = dO_i . O_i``, from one backward pass of the mean response-token
cross-entropy of a calibration sample; ``|E|`` is summed over the query heads of a GQA group.

The summary, the contract with the optimizer.  Block size ``b`` (default 64); query block
``qb = i // b``, key block ``kb = j // b``, block distance ``delta = qb - kb >= 0``; only
entries with ``j < i`` are counted (every rule keeps a query's own key).  Per (layer, KV head)
and length:

- ``far[delta, 2]``: sum of ``|E|`` over the entries at block distance ``delta``, part 0 the
  entries with ``i mod b >= j mod b`` (token distance ``i - j >= delta * b``), part 1 the rest;
- ``sink[k, delta, 2]``: the same restricted to key block ``k``, for ``k < K = max sink / b``;
- ``total``: ``far.sum()``.

Memory is ``O(N / b)`` per head.  A rule with sink ``k * b`` and span ``m * b`` drops exactly
``sum_{delta > m} far[delta].sum() + far[m, 0]`` minus the same expression on ``sink[k']`` for
every ``k' < k``; spans between block multiples are interpolated linearly (so the cost is exact
at block granularity); sinks must be whole blocks (a rule space asking otherwise is refused
with a ProfileError).  :meth:`Profile.dropped_influence` returns the optimizer's
``(layers * kv_heads, rules)`` cost matrix (layer-major; a full rule costs 0), averaged over the
samples of a length.

Modules: :mod:`.influence` (torch math, the oracle), :mod:`.cost` (rules -> dropped influence),
:mod:`.attention` (the profiling attention function), :mod:`.profiler` (running samples),
:mod:`.profile` (the record and its files), :mod:`.show` (plots), :mod:`.layout` (one device or
the layers over several GPUs, chosen by a memory estimate), :mod:`.job` (``moaplan profile``:
torchrun ranks, loading, the file).
"""

from moaplan.profile.profiler import calibration_hash, checkpoint_path, profile_model
from moaplan.profile.record import Profile, load_profile, save_profile
from moaplan.profile.show import show_profile

__all__ = ["Profile", "calibration_hash", "checkpoint_path", "load_profile", "profile_model",
           "save_profile", "show_profile"]
