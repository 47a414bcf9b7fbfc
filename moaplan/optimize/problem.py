"""The optimizer's plain array interface: a multiple-choice knapsack problem and its solution.

The profiler fills a :class:`KnapsackProblem` with numbers; nothing here knows about models,
profiles or plan files, so the optimizer can be tested and benchmarked on synthetic arrays.

Objective: ``sum_l w_l * (sum_h cost[l, h, choice_h]) / norm_l`` with weights ``w`` summing
to one and ``norm_l = sum_h max_r cost[l, h, r]``, the dropped influence when every head
takes its most damaging rule.  Each length's term is therefore a share in ``[0, 1]``, so
lengths whose raw influence differs by orders of magnitude (longer inputs drop more
entries) stay comparable and the weights alone set the trade-off between them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from moaplan.errors import BudgetError, ProfileError


@dataclass(frozen=True)
class KnapsackProblem:
    """One rule per head, average density ``<= budget`` at every target length.

    ``cost[l, h, r]``: dropped influence of rule ``r`` on head ``h`` at profiled length ``l``
    (``>= 0``; 0 for the full rule).  ``density[t, r]``: density of rule ``r`` at target
    length ``t`` (KV or attention density, see :mod:`moaplan.rules`), shared by every head;
    or ``density[t, h, r]`` when a candidate's density depends on the head (a query head's
    window capped at its KV head's span, say).  Every solver takes either form, indexing it
    through :meth:`head_density`, :meth:`pair_density` and :meth:`chosen_density`; a 3-D
    density whose heads share rows gives the plans of the 2-D one.  ``head_groups[h]`` is the
    layer of head ``h``; with ``group_max_density`` every layer's average density must also
    stay under that bound at every target length.  ``keep_full`` names heads that must take a
    rule that drops nothing (zero cost at every profiled length) whenever the budget allows
    it.  ``target_lengths`` (the lengths in tokens) only labels error messages.
    """

    cost: np.ndarray
    density: np.ndarray
    budget: float
    length_weights: np.ndarray | None = None
    head_groups: np.ndarray | None = None
    group_max_density: float | None = None
    target_lengths: tuple[int, ...] | None = None
    keep_full: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        cost = np.asarray(self.cost, dtype=np.float64)
        density = np.asarray(self.density, dtype=np.float64)
        if cost.ndim != 3 or 0 in cost.shape:
            raise ProfileError(f"cost must be a non-empty (lengths, heads, rules) array, "
                               f"got shape {cost.shape}")
        n_heads, n_rules = cost.shape[1:]
        if density.ndim not in (2, 3) or density.shape[0] == 0 or density.shape[1:] not in (
                (n_rules,), (n_heads, n_rules)):
            raise ProfileError(f"density must be (target lengths, {n_rules} rules) or (target "
                               f"lengths, {n_heads} heads, {n_rules} rules), "
                               f"got shape {density.shape}")
        if not np.isfinite(cost).all() or (cost < 0).any():
            raise ProfileError("costs must be finite and >= 0 (the profile is corrupt)")
        if not np.isfinite(density).all() or (density < 0).any():
            raise ProfileError("densities must be finite and >= 0")
        if not np.isfinite(self.budget) or self.budget <= 0:
            raise BudgetError(f"the density budget must be a number > 0, got {self.budget}")
        object.__setattr__(self, "cost", cost)
        object.__setattr__(self, "density", density)
        object.__setattr__(self, "budget", float(self.budget))
        object.__setattr__(self, "length_weights", self._checked_weights(cost.shape[0]))
        self._check_groups(cost.shape[1])
        keep = tuple(int(h) for h in self.keep_full)
        if any(not 0 <= h < cost.shape[1] for h in keep):
            raise ProfileError(f"keep_full names heads outside 0..{cost.shape[1] - 1}: {keep}")
        object.__setattr__(self, "keep_full", keep)
        if self.target_lengths is not None and len(self.target_lengths) != density.shape[0]:
            raise ProfileError(f"target_lengths must name {density.shape[0]} lengths, "
                               f"got {self.target_lengths!r}")

    def _checked_weights(self, n_lengths: int) -> np.ndarray:
        if self.length_weights is None:
            return np.full(n_lengths, 1.0 / n_lengths)
        w = np.asarray(self.length_weights, dtype=np.float64)
        if w.shape != (n_lengths,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ProfileError(f"length_weights must be {n_lengths} numbers >= 0 with a "
                               f"positive sum, got {self.length_weights!r}")
        return w / w.sum()

    def _check_groups(self, n_heads: int) -> None:
        if self.group_max_density is None:
            return
        if self.head_groups is None:
            raise BudgetError("group_max_density needs head_groups (the layer of each head)")
        groups = np.asarray(self.head_groups)
        if groups.shape != (n_heads,) or not np.issubdtype(groups.dtype, np.integer):
            raise ProfileError(f"head_groups must be {n_heads} integers, got {self.head_groups!r}")
        if not np.isfinite(self.group_max_density) or self.group_max_density <= 0:
            raise BudgetError(f"the per-layer density bound must be > 0, "
                              f"got {self.group_max_density}")
        object.__setattr__(self, "head_groups", groups)

    @property
    def n_heads(self) -> int:
        return self.cost.shape[1]

    @property
    def n_rules(self) -> int:
        return self.cost.shape[2]

    @property
    def per_head_density(self) -> bool:
        """Whether ``density`` is ``(target lengths, heads, rules)`` rather than shared."""
        return self.density.ndim == 3

    def head_density(self) -> np.ndarray:
        """``density`` as ``(target lengths, heads or 1, rules)``: a shared density gets a
        head axis of length 1, so it broadcasts against per-head arrays without a copy."""
        return self.density if self.per_head_density else self.density[:, None, :]

    def pair_density(self, heads: np.ndarray | int, rules: np.ndarray | int) -> np.ndarray:
        """``(target lengths, *shape)`` density of rule ``rules[i]`` on head ``heads[i]``
        (index arrays of one shape, or two ints): the one place a (head, rule) pair is looked up."""
        if self.per_head_density:
            return self.density[:, heads, rules]
        return self.density[:, rules]

    def chosen_density(self, choice: np.ndarray) -> np.ndarray:
        """``(target lengths, heads)`` density of each head's chosen rule."""
        return self.pair_density(np.arange(self.n_heads), choice)

    def min_mean_density(self, heads: np.ndarray | None = None) -> np.ndarray:
        """Smallest mean density ``heads`` (default: all) can reach at each target length on
        its own: the mean over those heads of each one's sparsest rule there."""
        smallest = self.density.min(axis=-1)
        if not self.per_head_density:
            return smallest  # every head reaches the same minimum: no mean, no rounding noise
        return smallest[:, slice(None) if heads is None else heads].mean(axis=1)

    def length_label(self, t: int) -> str:
        return f"N={self.target_lengths[t]}" if self.target_lengths else f"target length #{t}"

    def norms(self) -> np.ndarray:
        """``norm_l`` per profiled length; 1 where no rule drops anything (all costs zero)."""
        norm = self.cost.max(axis=2).sum(axis=1)
        return np.where(norm > 0, norm, 1.0)

    def coefficients(self) -> np.ndarray:
        """``(heads, rules)`` objective coefficient of each (head, rule) pair."""
        scale = self.length_weights / self.norms()
        coef = np.einsum("l,lhr->hr", scale, self.cost)
        if self.keep_full:
            # On a kept head a rule that drops anything costs more than any whole plan could
            # cost elsewhere, so every solver keeps the head full unless the budget forbids it.
            heads = list(self.keep_full)
            drops = (self.cost[:, heads] > 0).any(axis=0)
            penalty = 1.0 + coef.max(axis=1).sum()
            coef[heads] = coef[heads] + penalty * drops
        return coef

    def with_weights(self, length_weights: np.ndarray) -> KnapsackProblem:
        return replace(self, length_weights=np.asarray(length_weights, dtype=np.float64))

    def with_keep_full(self, heads: tuple[int, ...] | list[int]) -> KnapsackProblem:
        return replace(self, keep_full=tuple(heads))

    def groups(self) -> list[np.ndarray]:
        """Head indices of each layer, when a per-layer bound applies (else an empty list)."""
        if self.group_max_density is None:
            return []
        return [np.flatnonzero(self.head_groups == g) for g in np.unique(self.head_groups)]

    def is_feasible(self, choice: np.ndarray) -> bool:
        """Whether a plan meets the budget (and the per-layer bound) at every target length,
        compared exactly on the densities that are reported (see :func:`mean_density`)."""
        dens = self.chosen_density(choice)
        if (mean_density(dens) > self.budget).any():
            return False
        return all((mean_density(dens[:, g]) <= self.group_max_density).all()
                   for g in self.groups())

    def evaluate(self, choice: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(objective, densities per target length, raw cost per profiled length)``."""
        heads = np.arange(self.n_heads)
        raw = self.cost[:, heads, choice].sum(axis=1)
        objective = float((self.length_weights * raw / self.norms()).sum())
        return objective, mean_density(self.chosen_density(choice)), raw


def mean_density(dens: np.ndarray) -> np.ndarray:
    """Average over heads (last axis), rounded to 12 decimals: a plan that meets a budget of
    exactly 0.5 reports 0.5, not 0.5 plus the float summation's last-bit noise."""
    return np.round(dens.mean(axis=-1), 12)


@dataclass(frozen=True)
class Solution:
    """A plan as rule indices, with how good it is known to be.

    ``bound`` is a proven lower bound on the optimal objective and ``gap`` is
    ``(objective - bound) / objective`` (0 when the objective is 0).  ``status`` is
    ``"optimal"`` (within the requested gap) or ``"time_limit"`` (the best plan when time ran
    out).  ``method`` says where the plan came from: ``"highs"`` (the MILP) or ``"greedy"``
    (the greedy plan, when it was already proven good enough or beat HiGHS's incumbent).
    ``densities`` are per target length and ``costs`` the raw dropped influence per profiled
    length.
    """

    choice: np.ndarray
    objective: float
    bound: float
    gap: float
    seconds: float
    status: str
    densities: np.ndarray
    costs: np.ndarray
    method: str

    def key(self) -> tuple[int, ...]:
        """Identity of the plan, for de-duplication and caching."""
        return tuple(int(c) for c in self.choice)

    def to_dict(self) -> dict:
        """JSON-ready dict (the optuna study stores solutions this way)."""
        data = asdict(self)
        for name in ("choice", "densities", "costs"):
            data[name] = np.asarray(data[name]).tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Solution:
        return cls(choice=np.asarray(data["choice"], dtype=np.int64),
                   objective=float(data["objective"]), bound=float(data["bound"]),
                   gap=float(data["gap"]), seconds=float(data["seconds"]),
                   status=str(data["status"]), method=str(data["method"]),
                   densities=np.asarray(data["densities"], dtype=np.float64),
                   costs=np.asarray(data["costs"], dtype=np.float64))
