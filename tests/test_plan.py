"""The plan file: round trips, one clear error per kind of problem, imports, baselines."""

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml

from moaplan.errors import BudgetError, PlanError
from moaplan.plan import (
    Budget,
    ModelShape,
    Plan,
    duo_plan,
    import_duo,
    import_moa,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
    uniform_plan,
)
from moaplan.plan.interop import moa_rules_from_json
from moaplan.rules import Rule, attention_density, query_spans

SHAPE = ModelShape(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   model_type="llama", fingerprint="0123456789abcdef")


def sample_plan() -> Plan:
    rules = [[Rule.full_attention(), Rule(sink=64, alpha=128.0, beta=0.25, max_span=2000)],
             [Rule(sink=4, alpha=-4.0, beta=0.5, min_span=16, compensate=True),
              Rule.window(256, sink=64)]]
    return Plan(model=SHAPE, rules=rules, budget=Budget("kv", 0.5), lengths=[1024, 4096],
                predicted_loss={1024: 0.01, 4096: 0.02}, provenance={"profile": "p.safetensors"})


def test_round_trip(tmp_path):
    plan = sample_plan()
    first = load_plan(save_plan(plan, tmp_path / "plan.yaml"))
    assert first.model == plan.model and first.rules == plan.rules
    assert first.budget == plan.budget and first.lengths == plan.lengths
    assert first.predicted_loss == plan.predicted_loss
    second = load_plan(save_plan(first, tmp_path / "again.yaml"))
    assert second == first
    assert (tmp_path / "plan.yaml").read_text() == (tmp_path / "again.yaml").read_text()


def test_file_shows_densities_per_length(tmp_path):
    data = yaml.safe_load(save_plan(sample_plan(), tmp_path / "p.yaml").read_text())
    entry = data["predicted"][4096]
    dens = sample_plan().densities([4096])
    assert entry["kv_density"] == pytest.approx(dens["kv"].mean(), abs=1e-6)
    assert len(entry["attention_density_per_layer"]) == 2


def write(tmp_path, data) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def good_dict() -> dict:
    return plan_to_dict(sample_plan())


def mutate(change):
    data = good_dict()
    change(data)
    return data


@pytest.mark.parametrize("data, message", [
    ("format: [unclosed", r"not valid YAML \(line 1\)"),
    ("- just\n- a list\n", "not a moaplan plan"),
    (mutate(lambda d: d.update(format="moaplan/9")), "unsupported plan format 'moaplan/9'"),
    (mutate(lambda d: d.update(colour="red")), r"unknown key\(s\) colour in the plan"),
    (mutate(lambda d: d["model"].update(num_layers=-2)), r"model.num_layers must be >= 1"),
    (mutate(lambda d: d["model"].update(head_dim="big")), "model.head_dim must be an integer"),
    (mutate(lambda d: d["model"].update(num_key_value_heads=3)), "must be a multiple of"),
    (mutate(lambda d: d["rules"].pop()), r"'rules' has 1 layers but model.num_layers is 2"),
    (mutate(lambda d: d["rules"][1].append("full")), r"rules\[1\] has 3 rules but"),
    (mutate(lambda d: d["rules"][0].__setitem__(1, {"sink": -3, "alpha": 1, "beta": 0})),
     r"rules\[0\]\[1\].sink must be >= 0"),
    (mutate(lambda d: d["rules"][0].__setitem__(1, {"sink": 4, "alpha": "wide"})),
     r"rules\[0\]\[1\].alpha must be a number"),
    (mutate(lambda d: d["rules"][0].__setitem__(1, {"sink": 4, "span": 9})),
     r"unknown key\(s\) span in rules\[0\]\[1\]"),
    (mutate(lambda d: d["rules"][0].__setitem__(0, "dense")), r"rules\[0\]\[0\] must be 'full'"),
    (mutate(lambda d: d["rules"][0].__setitem__(1, {"min_span": 9, "max_span": 3})),
     "max_span \\(3\\) is smaller than min_span"),
    (mutate(lambda d: d.update(budget={"kind": "flops", "value": 0.5})),
     "budget.kind must be 'kv' or 'attention'"),
    (mutate(lambda d: d.update(budget={"kind": "kv", "value": 1.5})),
     r"budget.value must be in \(0, 1\]"),
    (mutate(lambda d: d.update(lengths=[1024, -5])), r"lengths\[1\] must be >= 1"),
])
def test_each_malformed_file_gets_its_own_error(tmp_path, data, message):
    with pytest.raises(PlanError, match=message) as err:
        load_plan(write(tmp_path, data))
    assert "\n" not in str(err.value)


def test_all_problems_are_reported_together(tmp_path):
    data = mutate(lambda d: (d["model"].update(head_dim=0), d.update(lengths=["x"])))
    with pytest.raises(PlanError, match="model.head_dim must be >= 1.*lengths\\[0\\]"):
        load_plan(write(tmp_path, data))


def test_missing_file():
    with pytest.raises(PlanError, match="does not exist"):
        load_plan("/nonexistent/plan.yaml")


class FakeConfig(dict):
    """Stands in for a transformers config: attributes plus to_dict()."""

    __getattr__ = dict.get

    def to_dict(self):
        return dict(self)


def test_plan_for_another_model_is_refused():
    config = FakeConfig(model_type="llama", num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, hidden_size=64, vocab_size=10)
    shape = ModelShape.from_config(config)
    plan = Plan(model=shape, rules=sample_plan().rules)
    plan.check_model(config)
    with pytest.raises(PlanError, match="2 layers x 2 KV heads.*3 layers"):
        plan.check_model(FakeConfig(config, num_hidden_layers=3))
    other = FakeConfig(config, vocab_size=11)
    with pytest.raises(PlanError, match="made for another llama"):
        plan.check_model(other)
    plan.check_model(other, strict=False)


def test_import_moa_32x32_gives_hand_computed_densities(tmp_path):
    rng = np.random.default_rng(0)
    alphas = rng.choice([256, 512, 1024, 2048], size=(32, 32)).astype(float)
    betas = rng.choice([0.0, 0.125, 0.25, 0.5], size=(32, 32))
    path = tmp_path / "moa.json"
    path.write_text(json.dumps({"alphas": alphas.tolist(), "betas": betas.tolist()}))
    shape = ModelShape(32, 32, 32, 128)
    plan = import_moa(path, shape)
    for n in (4096, 16384):
        spans = np.minimum(np.floor(alphas + betas * n + 0.5), n)
        kept = np.minimum(spans + 64, n)
        assert plan.densities([n])["kv"].mean() == pytest.approx(kept.mean() / n)
        c = kept
        by_hand = (c * (c + 1) / 2 + (n - c) * c) / (n * (n + 1) / 2)
        assert plan.densities([n])["attention"].mean() == pytest.approx(by_hand.mean())


def test_import_moa_gqa_takes_widest_rule(tmp_path):
    path = tmp_path / "moa.json"
    path.write_text(json.dumps({"alphas": [[100, 300, 50, 60]], "betas": [[0.5, 0.1, 0, 0]]}))
    with pytest.warns(UserWarning, match="widest rule of each group of 2"):
        plan = import_moa(path, ModelShape(1, 4, 2, 16))
    # The cache keeps the widest (widest_rule: 100 + 0.5N overtakes 300 + 0.1N at N = 500,
    # span 350: below that, min_span holds it); the prefill keeps each query head's own span.
    assert plan.rules[0][0] == Rule(sink=64, alpha=100.0, beta=0.5, min_span=350,
                                    query_windows=((100.0, 0.5), (300.0, 0.1)))
    assert plan.rules[0][1] == Rule(sink=64, alpha=60.0, beta=0.0,
                                    query_windows=((50.0, 0.0), (60.0, 0.0)))
    lengths = np.arange(1, 2000)
    widest = np.maximum(np.minimum(100 + 0.5 * lengths, lengths),
                        np.minimum(300 + 0.1 * lengths, lengths))
    assert (plan.rules[0][0].span(lengths) >= np.floor(widest)).all()
    assert (plan.rules[0][0].span(lengths[lengths >= 500])
            == np.floor(widest[lengths >= 500] + 0.5)).all()
    # A query window never exceeds the rule, and keeps its own span below the rule's min_span.
    by_query = query_spans(plan.rules[0], lengths, 2)
    assert (by_query[:2] <= plan.rules[0][0].span(lengths)).all()
    assert by_query[:2, 399].tolist() == [300, 340]  # at N = 400, not min_span's 350
    n = 1000
    assert query_spans(plan.rules[0], n, 2).tolist() == [600, 400, 50, 60]
    assert plan.densities([n])["kv"][0, 0, 0] == pytest.approx((64 + 600) / n)
    by_head = attention_density(64, np.array([600, 400]), n).mean()
    assert plan.densities([n])["attention"][0, 0, 0] == pytest.approx(by_head)
    # Members that all match the widest need no windows; a full widest member keeps 64
    # sinks and a span of N for the narrower ones.
    rules = moa_rules_from_json({"alphas": [[5, 5, 0, 100]], "betas": [[0.5, 0.5, 1, 0.25]]}, 2)
    assert rules[0][0] == Rule(sink=64, alpha=5.0, beta=0.5)
    assert rules[0][1] == Rule(sink=64, alpha=0.0, beta=1.0,
                               query_windows=((0.0, 1.0), (100.0, 0.25)))
    assert query_spans(rules[0][1:], n, 2).tolist() == [n, 350]


def test_query_windows_round_trip_and_validation(tmp_path):
    shape = ModelShape(1, 4, 2, 16)
    windows = Rule(sink=8, alpha=50.0, beta=0.5, query_windows=((10.0, 0.25), (-5.0, 0.5)))
    plan = Plan(model=shape, rules=[[windows, Rule.full_attention()]], lengths=[256])
    path = save_plan(plan, tmp_path / "p.yaml")
    assert load_plan(path).rules == plan.rules
    assert "query_windows" in path.read_text()
    with pytest.raises(PlanError, match="3 query windows"):
        Plan(model=shape, rules=[[replace(windows, query_windows=((1.0, 0.0),) * 3),
                                  windows]])
    with pytest.raises(ValueError, match="without compensation"):
        replace(windows, compensate=True)
    with pytest.raises(ValueError, match="windowed rule"):
        Rule(full=True, query_windows=((1.0, 0.0),))
    data = plan_to_dict(plan)
    data["rules"][0][0]["query_windows"] = [[1, -0.5], "x"]
    with pytest.raises(PlanError, match=r"query_windows must be a list of \[alpha, beta\]"):
        plan_from_dict(data)
    data["rules"][0][0]["query_windows"] = [[1, -0.5], [2, 0]]
    with pytest.raises(PlanError, match=r"query_windows\[0\]\[1\] must be >= 0"):
        plan_from_dict(data)


def test_import_moa_rejects_bad_files(tmp_path):
    path = tmp_path / "moa.json"
    path.write_text(json.dumps({"alphas": [[1, 2]]}))
    with pytest.raises(PlanError, match="not a MoA plan"):
        import_moa(path, ModelShape(1, 2, 2, 16))
    path.write_text(json.dumps({"alphas": [[1, 2]], "betas": [[0, 0]]}))
    with pytest.raises(PlanError, match="1 layers x 2 heads, the model has 2 x 2"):
        import_moa(path, ModelShape(2, 2, 2, 16))


def test_import_duo(tmp_path):
    path = tmp_path / "full_attention_heads.tsv"
    path.write_text("0.9\t0.1\n0.2\t0.7\n")
    plan = import_duo(path, SHAPE, threshold=0.5)
    assert [[r.full for r in row] for row in plan.rules] == [[True, False], [False, True]]
    plan = import_duo(path, SHAPE, sparsity=0.75)
    assert sum(r.full for r in plan.flat_rules) == 1 and plan.rules[0][0].full
    with pytest.raises(PlanError, match="exactly one of threshold or sparsity"):
        import_duo(path, SHAPE)
    with pytest.raises(PlanError, match="gates are 2 layers x 2 heads"):
        import_duo(path, ModelShape(3, 4, 2, 16), threshold=0.5)


@pytest.mark.parametrize("kind", ["kv", "attention"])
@pytest.mark.parametrize("value", [0.5, 0.3, 0.2])
def test_uniform_plan_meets_budget_at_every_length(kind, value):
    lengths = [1024, 2048, 4096, 8192]
    plan = uniform_plan(SHAPE, Budget(kind, value), lengths)
    dens = plan.densities(lengths)[kind].mean((0, 1))
    assert (dens <= value + 1e-9).all() and (dens >= value - 0.01).all()
    assert len(set(plan.flat_rules)) == 1


def test_uniform_plan_impossible_budget():
    with pytest.raises(BudgetError, match="no uniform rule"):
        uniform_plan(SHAPE, Budget("kv", 0.01), [1024])


def test_duo_plan_full_heads_follow_scores():
    shape = ModelShape(4, 8, 4, 16)
    scores = np.arange(16, dtype=float).reshape(4, 4)
    lengths = [2048, 4096]
    plan = duo_plan(shape, scores, Budget("kv", 0.5), lengths)
    full = np.array([[r.full for r in row] for row in plan.rules])
    n_full = full.sum()
    assert full.reshape(-1)[-n_full:].all() and not full.reshape(-1)[:-n_full].any()
    dens = plan.densities(lengths)["kv"].mean((0, 1))
    assert (dens <= 0.5).all()
    # One more full head would break the budget at the shortest length.
    stream = (64 + 256) / 2048
    assert (n_full + 1 + (16 - n_full - 1) * stream) / 16 > 0.5
