"""The optimizer: exact on enumerable instances, a plan and an honest gap under a time limit,
clear budget errors, and an optuna study that caches and resumes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from moaplan.errors import BudgetError, ProfileError
from moaplan.optimize import (
    Candidate,
    KnapsackProblem,
    best_candidate,
    default_storage,
    greedy,
    lagrangian_bound,
    measure,
    pareto_plans,
    prune_dominated,
    scores,
    simplex_weights,
    solve,
)
from moaplan.optimize.milp import run_highs
from moaplan.optimize.select import open_study
from moaplan.optimize.synthetic import masked_mass, synthetic_problem
from moaplan.rules import RuleSpace


def _random_problem(rng: np.random.Generator, *, groups: bool,
                    per_head: bool = False) -> KnapsackProblem:
    """4 heads (2 layers x 2), 5 rules (rule 0 is full), 2 profiled and 3 target lengths;
    ``per_head``: every head's densities its own."""
    cost = rng.random((2, 4, 5))
    cost[:, :, 0] = 0.0
    density = rng.uniform(0.05, 0.95, (3, 4, 5) if per_head else (3, 5))
    density[..., 0] = 1.0
    return KnapsackProblem(cost=cost, density=density, budget=float(rng.uniform(0.3, 0.8)),
                           length_weights=rng.uniform(0.1, 1.0, 2),
                           head_groups=np.array([0, 0, 1, 1]),
                           group_max_density=float(rng.uniform(0.4, 0.9)) if groups else None)


def _brute_force(problem: KnapsackProblem) -> float | None:
    """Optimal objective by enumerating every choice, None if no choice is feasible."""
    best = None
    for choice in itertools.product(range(problem.n_rules), repeat=problem.n_heads):
        choice = np.array(choice)
        if not _feasible(problem, choice):
            continue
        objective = problem.evaluate(choice)[0]
        best = objective if best is None else min(best, objective)
    return best


def _feasible(problem: KnapsackProblem, choice: np.ndarray, tol: float = 1e-9) -> bool:
    heads = np.arange(problem.n_heads)
    dens = problem.density[:, heads, choice] if problem.density.ndim == 3 else \
        problem.density[:, choice]  # (targets, heads)
    if (dens.mean(axis=1) > problem.budget + tol).any():
        return False
    if problem.group_max_density is None:
        return True
    return all((dens[:, problem.head_groups == g].mean(axis=1)
                <= problem.group_max_density + tol).all()
               for g in np.unique(problem.head_groups))


@pytest.mark.parametrize("groups,per_head", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_solve_matches_brute_force(groups: bool, per_head: bool) -> None:
    rng = np.random.default_rng(1 + groups + 10 * per_head)
    solved, by_highs = 0, 0
    for _ in range(30):
        problem = _random_problem(rng, groups=groups, per_head=per_head)
        optimum = _brute_force(problem)
        if optimum is None:
            with pytest.raises(BudgetError):
                solve(problem)
            continue
        solution = solve(problem, mip_gap=0.0)
        assert _feasible(problem, solution.choice)
        assert solution.objective == pytest.approx(optimum, rel=1e-9, abs=1e-12)
        assert solution.status == "optimal"
        assert solution.bound <= solution.objective and solution.gap <= 1e-6
        assert lagrangian_bound(problem) <= optimum + 1e-12
        fallback = greedy(problem)
        assert fallback is None or _feasible(problem, fallback)
        solved += 1
        by_highs += solution.method == "highs"
    assert solved >= 10 and by_highs >= 5  # not all infeasible, and the MILP really ran


def test_pruning_keeps_one_of_identical_rules_and_drops_dominated() -> None:
    density = np.array([[0.2, 0.2, 0.3, 0.5], [0.3, 0.3, 0.3, 0.1]])
    coef = np.array([[1.0, 1.0, 2.0, 0.5]])
    keep = prune_dominated(coef, density)
    # rule 1 duplicates rule 0; rule 2 is denser and costlier than rule 0; rule 3 is cheaper
    # but denser at one length, so it stays.
    assert keep.tolist() == [[True, False, False, True]]


def test_time_limit_still_returns_a_plan_with_its_gap() -> None:
    problem = synthetic_problem(32, 8, 0.5, profiled_lengths=(2048, 4096),
                                target_lengths=(4096, 8192, 16384))
    # mip_gap=0 so that the greedy plan and Lagrangian bound cannot settle it before HiGHS.
    rushed = solve(problem, time_limit=0.01, mip_gap=0.0)
    assert rushed.status == "time_limit"
    assert (rushed.densities <= 0.5).all() and _feasible(problem, rushed.choice)
    assert 0.0 <= rushed.bound <= rushed.objective and 0.0 <= rushed.gap < 0.01
    exact = solve(problem, mip_gap=1e-4)
    assert rushed.bound <= exact.objective * (1 + 1e-9)
    assert exact.objective <= rushed.objective * (1 + 1e-9)


def test_a_plan_exactly_at_the_budget_is_allowed_and_reported_exactly() -> None:
    # Both heads on the half-density rule hit the budget exactly and cost least.
    cost = np.array([[[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]]])
    density = np.array([[1.0, 0.5, 0.25], [1.0, 0.5, 0.25]])
    problem = KnapsackProblem(cost=cost, density=density, budget=0.5)
    assert run_highs(problem, None, 0.0)[0].tolist() == [1, 1]
    solution = solve(problem, mip_gap=0.0)
    assert solution.choice.tolist() == [1, 1] and solution.densities.tolist() == [0.5, 0.5]


def test_below_reachable_density_names_the_minimum_at_each_length() -> None:
    space = RuleSpace(sinks=(64,), alphas=(256,), betas=(0.0, 0.25))
    lengths = (4096, 16384)
    problem = KnapsackProblem(cost=np.ones((1, 2, len(space))),
                              density=space.density(lengths).T, budget=0.05,
                              target_lengths=lengths)
    with pytest.raises(BudgetError) as err:
        solve(problem)
    message = str(err.value)
    assert "\n" not in message and "0.05" in message
    assert "0.07812 at N=4096" in message and "0.01953 at N=16384" in message


def test_budget_reachable_per_length_but_not_jointly() -> None:
    density = np.array([[1.0, 0.2, 0.8], [1.0, 0.8, 0.2]])
    problem = KnapsackProblem(cost=np.ones((1, 3, 3)), density=density, budget=0.4)
    with pytest.raises(BudgetError, match="at every target length at once"):
        solve(problem)


def test_per_layer_bound_is_respected() -> None:
    rng = np.random.default_rng(7)
    cost = rng.random((1, 8, 4)) * np.array([0.0, 1.0, 2.0, 3.0])  # sparser costs more
    density = np.array([[1.0, 0.6, 0.4, 0.2]])
    free = KnapsackProblem(cost=cost, density=density, budget=0.6,
                           head_groups=np.repeat([0, 1], 4))
    bounded = KnapsackProblem(cost=cost, density=density, budget=0.6,
                              head_groups=np.repeat([0, 1], 4), group_max_density=0.61)
    loose, tight = solve(free, mip_gap=0.0), solve(bounded, mip_gap=0.0)
    assert _feasible(bounded, tight.choice)
    assert tight.objective >= loose.objective - 1e-12


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ProfileError, match="density must be"):
        KnapsackProblem(cost=np.ones((1, 2, 3)), density=np.ones((2, 4)), budget=0.5)
    with pytest.raises(ProfileError, match=">= 0"):
        KnapsackProblem(cost=-np.ones((1, 2, 3)), density=np.ones((2, 3)), budget=0.5)
    with pytest.raises(BudgetError, match="> 0"):
        KnapsackProblem(cost=np.ones((1, 2, 3)), density=np.ones((2, 3)), budget=0.0)
    with pytest.raises(BudgetError, match="head_groups"):
        KnapsackProblem(cost=np.ones((1, 2, 3)), density=np.ones((2, 3)), budget=0.5,
                        group_max_density=0.5)


def test_masked_mass_matches_the_mask() -> None:
    rng = np.random.default_rng(3)
    n, f = 40, rng.random(40)
    sink, span = np.array([0, 3, 5, 0, 30]), np.array([1, 4, 10, 40, 20])
    expected = [sum(f[i - j] for i in range(n) for j in range(i + 1)
                    if not (j < s or i - j < w)) for s, w in zip(sink, span)]
    assert np.allclose(masked_mass(f, sink, span, n), expected)


def test_simplex_weights_and_pareto_plans_are_deduplicated() -> None:
    grid = simplex_weights(2, 4)
    assert len(grid) == 5 and all(np.isclose(w.sum(), 1.0) for w in grid)
    problem = synthetic_problem(2, 4, 0.3, space=RuleSpace(alphas=(32, 256, 1024, 4096),
                                                          betas=(0.0, 0.125, 0.5)),
                                profiled_lengths=(1024, 8192), target_lengths=(1024, 8192))
    plans = pareto_plans(problem, [*grid, *grid])
    keys = [p.key() for p in plans]
    assert len(keys) == len(set(keys)) >= 2  # the two lengths really pull apart


def _toy_problem() -> KnapsackProblem:
    return synthetic_problem(2, 4, 0.35, space=RuleSpace(alphas=(32, 256, 1024, 4096),
                                                        betas=(0.0, 0.125, 0.5)),
                             profiled_lengths=(1024, 4096), target_lengths=(1024, 4096, 16384))


def _walk(values: dict[str, list[float]], names: list[str], digests: list[str], storage,
          calls: list[str], interrupt_at: int | None = None):
    """Measure candidates whose running scores per step are ``values[digest]``."""
    candidates = [Candidate(n, d, prunable=not n.startswith("baseline"))
                  for n, d in zip(names, digests)]
    study = open_study(storage, "s")

    def evaluate(index, report):
        if interrupt_at is not None and len(calls) == interrupt_at:
            calls.append("interrupted")
            raise KeyboardInterrupt  # the user hits ^C during this evaluation
        calls.append(digests[index])
        for step, value in enumerate(values[digests[index]]):
            report(step, value)
        return values[digests[index]][-1], {"seen": digests[index]}

    return measure(candidates, evaluate, study=study)


def test_measure_walks_each_candidate_once_caches_and_resumes(tmp_path) -> None:
    storage = default_storage(tmp_path / "plan.yaml")
    assert storage.startswith("sqlite:///") and storage.endswith("plan.optuna.db")
    values = {"a": [0.5, 0.5], "b": [0.2, 0.1], "c": [0.3, 0.3]}
    names, digests = ["one", "two", "three", "again"], ["a", "b", "c", "b"]
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _walk(values, names, digests, storage, calls, interrupt_at=1)
    study = _walk(values, names, digests, storage, calls)
    assert calls == ["a", "interrupted", "c", "b"]  # "two" is requeued; "again" is "two"
    done = scores(study)
    assert sorted(done) == [0, 1, 2, 3]  # the interrupted trial is not counted
    assert all(state == "complete" for state, _, _ in done.values())
    assert done[3][1] == done[1][1] == 0.1 and done[3][2]["seen"] == "b"
    assert names[best_candidate(study)] == "two"
    # A finished study measures nothing more.
    _walk(values, names, digests, storage, calls)
    assert len(calls) == 4


def test_measure_prunes_clearly_worse_candidates_but_never_baselines() -> None:
    good, bad = [0.1, 0.1, 0.1], [5.0, 5.0, 5.0]
    values = {"g1": good, "g2": [0.11] * 3, "g3": [0.12] * 3, "bad": bad, "base": bad}
    names = ["g1", "g2", "g3", "worse", "baseline"]
    calls: list[str] = []
    study = _walk(values, names, ["g1", "g2", "g3", "bad", "base"], None, calls)
    done = scores(study)
    assert done[3][0] == "pruned" and done[3][1] == 5.0  # stopped at its second step
    assert done[4][0] == "complete"  # the baseline is measured to the end
    assert names[best_candidate(study)] == "g1"


@pytest.mark.parametrize("seed", range(4))
def test_kept_heads_stay_full_when_the_budget_allows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = _random_problem(rng, groups=False)
    density = problem.density.copy()
    density[:, 4] = 0.05  # so two full heads and two of rule 4 fit the budget: 2.1 <= 2.4
    problem = KnapsackProblem(cost=problem.cost, density=density, budget=0.6)
    kept = problem.with_keep_full([1, 3])
    solution = solve(kept)
    assert list(solution.choice[[1, 3]]) == [0, 0]  # rule 0 is the full one
    assert _feasible(kept, solution.choice)
    # Among plans that keep them, it is the best: the brute force over the other two heads.
    best = min(problem.evaluate(np.array([a, 0, b, 0]))[0]
               for a, b in itertools.product(range(5), repeat=2)
               if problem.is_feasible(np.array([a, 0, b, 0])))
    assert solution.objective == pytest.approx(best, rel=1e-6)
    # A budget too tight to keep them all still gives a feasible plan.
    tight = KnapsackProblem(cost=problem.cost, density=density, budget=0.3,
                            keep_full=(0, 1, 2, 3))
    assert _feasible(tight, solve(tight).choice)
    with pytest.raises(ProfileError, match="keep_full names heads outside"):
        problem.with_keep_full([4])


@pytest.mark.parametrize("layer_bound", [None, 0.25])
def test_per_head_density_with_shared_rows_gives_the_shared_plans(layer_bound) -> None:
    shared = replace(synthetic_problem(4, 4, 0.2, profiled_lengths=(2048, 4096),
                                       target_lengths=(4096, 8192, 16384)),
                     group_max_density=layer_bound)
    repeated = np.repeat(shared.density[:, None, :], shared.n_heads, axis=1)
    per_head = replace(shared, density=repeated)
    assert per_head.per_head_density and not shared.per_head_density
    coef = shared.coefficients()
    assert (prune_dominated(coef, repeated) == prune_dominated(coef, shared.density)).all()
    assert greedy(per_head).tolist() == greedy(shared).tolist()
    assert lagrangian_bound(per_head) == lagrangian_bound(shared)
    for gap in (1e-3, 0.0):
        a, b = solve(shared, mip_gap=gap), solve(per_head, mip_gap=gap)
        assert a.choice.tolist() == b.choice.tolist()
        assert (a.objective, a.bound, a.method) == (b.objective, b.bound, b.method)
        assert a.densities.tolist() == b.densities.tolist()


def test_pruning_judges_dominance_with_each_heads_own_densities() -> None:
    # Rule 1 costs no less than rule 0 on either head; it is denser on head 0 (dominated)
    # but sparser on head 1, where it stays.  Shared, head 0's densities drop it everywhere.
    density = np.array([[[0.2, 0.3], [0.5, 0.4]]])  # (1 target, 2 heads, 2 rules)
    coef = np.array([[1.0, 1.0], [1.0, 2.0]])
    assert prune_dominated(coef, density).tolist() == [[True, False], [True, True]]
    assert prune_dominated(coef, density[:, 0]).tolist() == [[True, False], [True, False]]
    problem = KnapsackProblem(cost=coef[None], density=density, budget=0.3)
    solution = solve(problem, mip_gap=0.0)
    assert solution.choice.tolist() == [0, 1] and solution.densities.tolist() == [0.3]


def test_per_head_reachable_budget_is_the_mean_of_the_heads_minima() -> None:
    density = np.array([[[1.0, 0.1, 0.5], [1.0, 0.6, 0.3]]])  # minima 0.1 and 0.3
    cost = np.array([[[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]])
    with pytest.raises(BudgetError, match="is below the smallest density") as err:
        solve(KnapsackProblem(cost=cost, density=density, budget=0.19))
    assert "0.2 at target length #0" in str(err.value)
    at_minimum = solve(KnapsackProblem(cost=cost, density=density, budget=0.2))
    assert at_minimum.choice.tolist() == [1, 2] and at_minimum.densities.tolist() == [0.2]
    # A layer whose heads reach only 0.3 breaks a per-layer bound the mean over all meets.
    grouped = KnapsackProblem(cost=np.concatenate([cost, cost], axis=1),
                              density=np.concatenate([density, density[:, ::-1]], axis=1),
                              budget=0.5, head_groups=np.array([0, 1, 1, 0]),
                              group_max_density=0.25)
    with pytest.raises(BudgetError, match="per-layer density bound 0.25"):
        solve(grouped)


def test_per_head_density_of_the_wrong_shape_is_a_clear_error() -> None:
    with pytest.raises(ProfileError, match=r"density must be .* 2 heads, 3 rules\), got shape"):
        KnapsackProblem(cost=np.ones((1, 2, 3)), density=np.ones((2, 4, 3)), budget=0.5)
    with pytest.raises(ProfileError, match="density must be"):
        KnapsackProblem(cost=np.ones((1, 2, 3)), density=np.ones((2, 2, 4)), budget=0.5)
