"""`moaplan search` and `moaplan baseline` end to end on tiny local checkpoints."""

import json

import numpy as np
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import moaplan
from moaplan.cli import main
from moaplan.model import byte_tokenizer, load_model
from moaplan.plan import load_plan

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=259, max_position_embeddings=1024,
            bos_token_id=256, eos_token_id=257, pad_token_id=258)
LENGTHS = ["256", "512"]
SEARCH = ["--lengths", *LENGTHS, "--validation-length", "384", "--samples", "2",
          "--validation-samples", "6", "--candidates", "5", "--ablate", "2"]


def save_tiny(kind: str, path) -> None:
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    else:
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=None))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def write_calibration(path, count: int = 6) -> None:
    """``count`` records for each of the lengths 256, 384 and 512 (within 25% below each)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "key", "value", "the", "is", "of"]
    with path.open("w") as f:
        for size in (230, 350, 470):
            for i in range(count):
                prompt = ""
                while len(prompt) < size - 40:
                    prompt += " " + str(rng.choice(words))
                response = " ".join(rng.choice(words, 6))[:30]
                record = {"prompt": prompt + f" the key {i} is", "response": response}
                f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, root / "model")
    write_calibration(root / "calib.jsonl")
    return root


def test_search_end_to_end(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint)
    out = checkpoint / "plan.yaml"
    args = ["search", "--budget", "0.5", "--model", str(checkpoint / "model"), "--data",
            str(checkpoint / "calib.jsonl"), *SEARCH, "--out", str(out)]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert "KL to dense [95% CI]" in summary and "chosen: " in summary
    for name in ("streaming", "optimizer"):  # baselines and optimizer plans are candidates
        assert f"\n{name} " in summary
    plan = load_plan(out)
    targets = [256, 384, 512]
    assert plan.lengths == targets
    assert (plan.densities(targets)["kv"].mean((0, 1)) <= 0.5 + 1e-9).all()
    search = plan.provenance["search"]
    assert search["validation"]["samples"] == 6 and len(search["candidates"]) <= 5
    assert search["candidates"]["streaming"]["state"] == "complete"  # never pruned
    assert len(search["ablated_heads"]) == 2  # --ablate 2: measured one head at a time
    assert set(search["predicted_vs_measured_spearman"]) == {"first_order", "corrected"}
    # the lowest KL, and every other complete candidate's paired interval against it
    chosen = search["candidates"][search["chosen"]]
    assert chosen["kl"] == min(c["kl"] for c in search["candidates"].values()
                               if c["state"] == "complete")
    assert chosen["vs_chosen_95"] == [0.0, 0.0]
    assert all(len(c["vs_chosen_95"]) == 2 for c in search["candidates"].values()
               if c["state"] == "complete")
    profile = next((checkpoint / "profiles").glob("*.safetensors"))
    assert plan.provenance["profile"] == str(profile.relative_to(checkpoint))

    # The plan runs on the model it was made for.
    model, tokenizer = load_model(checkpoint / "model")
    moaplan.apply(model, out)
    ids = tokenizer("the key 3 is", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

    # A second search reuses the profile and the finished optuna study.
    stamp = profile.stat().st_mtime_ns
    assert main(args) == 0
    assert profile.stat().st_mtime_ns == stamp
    assert load_plan(out).rules == plan.rules


def test_impossible_budget_names_the_reachable_density(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint)
    code = main(["search", "--budget", "0.01", "--model", str(checkpoint / "model"), "--data",
                 str(checkpoint / "calib.jsonl"), *SEARCH, "--out", "x.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "budget 0.01 is below the smallest density" in err and "at N=256" in err
    assert not (checkpoint / "profiles").exists() or not list((checkpoint / "profiles").glob(
        "*.partial*")), "an impossible budget must fail before profiling"


@pytest.mark.parametrize("kind", ["streaming", "duo"])
def test_baselines(checkpoint, monkeypatch, kind):
    monkeypatch.chdir(checkpoint)
    out = checkpoint / f"{kind}.yaml"
    # At 256 tokens the 64 + 64 streaming rule alone is density 0.5: leave room for full heads.
    assert main(["baseline", kind, "--budget", "0.75", "--model", str(checkpoint / "model"),
                 "--data", str(checkpoint / "calib.jsonl"), "--lengths", *LENGTHS,
                 "--samples", "2", "--recent", "64", "--sink", "64", "--out", str(out)]) == 0
    plan = load_plan(out)
    assert (plan.densities([256, 512])["kv"].mean((0, 1)) <= 0.75 + 1e-9).all()
    if kind == "duo":
        assert {r.full for r in plan.flat_rules} == {True, False}


def test_too_little_data(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint)
    code = main(["search", "--budget", "0.5", "--model", str(checkpoint / "model"), "--data",
                 str(checkpoint / "calib.jsonl"), "--lengths", "256", "1024", "--samples", "8",
                 "--validation-length", "384", "--out", "x.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and "records of" in err and "are needed here" in err


def test_search_uses_a_head_scorer_profile(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint)
    scores = checkpoint / "induction.safetensors"
    assert main(["profile", "--scorer", "induction", "--model", str(checkpoint / "model"),
                 "--lengths", *LENGTHS, "--samples", "1", "--out", str(scores)]) == 0
    out = checkpoint / "plan-induction.yaml"
    assert main(["search", "--budget", "0.5", "--model", str(checkpoint / "model"), "--data",
                 str(checkpoint / "calib.jsonl"), *SEARCH, "--profile", str(scores),
                 "--out", str(out)]) == 0
    plan = load_plan(out)
    assert plan.provenance["profile"] == str(scores)
    assert (plan.densities([256, 384, 512])["kv"].mean((0, 1)) <= 0.5 + 1e-9).all()
    # a head scorer prices KV heads only: query heads' spans need a gradient profile
    capsys.readouterr()
    assert main(["search", "--budget", "0.5", "--attention-budget", "0.7", "--model",
                 str(checkpoint / "model"), "--data", str(checkpoint / "calib.jsonl"), *SEARCH,
                 "--profile", str(scores), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no per-query-head summaries" in err


def test_profile_then_search_and_duo_reuse_the_default_profile(checkpoint, tmp_path,
                                                               monkeypatch, capsys):
    import moaplan.profile.profiler

    monkeypatch.chdir(tmp_path)  # an empty profiles/ (the module's checkpoint dir has one)
    model, data = str(checkpoint / "model"), str(checkpoint / "calib.jsonl")
    assert main(["profile", "--model", model, "--data", data, "--lengths", *LENGTHS,
                 "--samples", "2"]) == 0
    (written,) = (tmp_path / "profiles").glob("*.safetensors")
    stamp = written.stat().st_mtime_ns

    def no_profiling(*args, **kwargs):
        raise AssertionError("the profile written by `moaplan profile` was not reused")

    monkeypatch.setattr(moaplan.profile.profiler, "profile_model", no_profiling)
    assert main(["search", "--budget", "0.5", "--model", model, "--data", data, *SEARCH,
                 "--out", "plan.yaml"]) == 0
    assert load_plan(tmp_path / "plan.yaml").provenance["profile"] == str(
        written.relative_to(tmp_path))
    assert main(["baseline", "duo", "--budget", "0.75", "--model", model, "--data", data,
                 "--lengths", *LENGTHS, "--samples", "2", "--recent", "64",
                 "--out", "duo.yaml"]) == 0
    assert written.stat().st_mtime_ns == stamp
    assert {p.name for p in (tmp_path / "profiles").iterdir()} == {
        written.name, written.name.replace(".safetensors", ".profile.yaml")}


def test_ablation_correction_scales_up_only_the_heads_that_lose_more_than_predicted():
    from moaplan.plan import Budget, ModelShape
    from moaplan.profile import Profile
    from moaplan.search import SearchSettings, correction_factors, protection_order

    shape = ModelShape(num_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    rng = np.random.default_rng(0)
    profile = Profile(model=shape, block=64, lengths=[1024], samples={1024: 1})
    profile.add(1024, rng.random((8, 16, 2)), rng.random((8, 1, 16, 2)))
    settings = SearchSettings(budget=Budget("kv", 0.5), lengths=[1024], validation_length=768)
    share = profile.dropped_share(moaplan.plan.uniform_rule(settings.budget,
                                                            settings.target_lengths))
    a, b, big, small = [int(h) for h in np.flatnonzero(share > 0)[:4]]
    # Against the typical (median) head: ``big`` loses ten times what its share predicts,
    # ``small`` a tenth of it; ``a`` and ``b`` as predicted (0.01 per unit of share).
    measured = {a: 0.01 * share[a], b: 0.01 * share[b], big: 0.1 * share[big],
                small: 0.001 * share[small]}
    factors = correction_factors(profile, settings, {h: float(v) for h, v in measured.items()})
    assert factors[big] == pytest.approx(10.0)
    # a head that loses less than predicted keeps its costs: the ablation priced one rule
    assert factors[a] == factors[b] == factors[small] == 1.0
    others = [h for h in range(8) if h not in measured]
    assert (factors[others] == 1.0).all()  # not measured: unchanged
    assert protection_order(profile, settings, measured)[0] == big


def _random_profile(shape, lengths: list[int]):
    from moaplan.profile import Profile

    rng = np.random.default_rng(1)
    profile = Profile(model=shape, block=64, lengths=lengths, samples={n: 1 for n in lengths})
    for n in lengths:
        profile.add(n, rng.random(profile.far_sum[n].shape), rng.random(profile.sink_sum[n].shape))
    return profile


def test_duo_stays_a_candidate_where_its_default_window_does_not_fit():
    """At KV 0.3 from 1K, 64 sinks + 256 recent keys (31% of 1K) leave no room for full heads:
    the Duo candidate takes the shorter recent window that fits and drops the least (measured:
    without it the search never compared against the Duo plan the benchmark then beat it
    with)."""
    from moaplan.errors import BudgetError
    from moaplan.plan import Budget, ModelShape, best_duo_plan, duo_plan
    from moaplan.search import SearchSettings, candidate_plans

    shape = ModelShape(num_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    lengths = [1024, 2048, 4096]
    profile = _random_profile(shape, lengths)
    budget = Budget("kv", 0.3)
    with pytest.raises(BudgetError):
        duo_plan(shape, profile.duo_scores(64, 256), budget, lengths)
    plan = best_duo_plan(profile, budget, lengths)
    assert plan.provenance["recent"] < 256 and plan.provenance["full_heads"] > 0
    assert (plan.densities(lengths)["kv"].mean((0, 1)) <= 0.3 + 1e-9).all()
    # of the feasible windows, the one that drops the least
    costs = {}
    for recent in (128, 64, 32):
        try:
            other = duo_plan(shape, profile.duo_scores(64, recent), budget, lengths, 64, recent)
        except BudgetError:
            continue
        costs[recent] = profile.dropped_share(other.flat_rules).sum()
    assert plan.provenance["recent"] == min(costs, key=costs.get)

    settings = SearchSettings(budget=budget, lengths=lengths, validation_length=3072, ablate=0)
    names = [name for name, _, _ in candidate_plans(profile, settings, np.ones(16),
                                                     list(range(16)))]
    assert "duo" in names and "streaming" in names
    # Duo's full heads also enter with the budget Duo leaves unspent given to the others
    candidates = {name: plan for name, plan, _ in candidate_plans(
        profile, settings, np.ones(16), list(range(16)))}
    spent = candidates["duo heads full, rest uniform"]
    assert [r.full for r in spent.flat_rules] == [r.full for r in plan.flat_rules]
    kv = spent.densities(lengths)["kv"].mean((0, 1))
    assert (kv <= 0.3 + 1e-9).all() and (kv > plan.densities(lengths)["kv"].mean((0, 1))).all()


def test_candidates_meet_an_attention_budget_by_query_heads_spans():
    """With an attention budget every candidate keeps its KV rules (the cache) and narrows
    its query heads to meet it; the KV optimizer's and the streaming plan also enter with
    the common cap of every query head's span (the heuristic)."""
    from moaplan.plan import Budget, ModelShape
    from moaplan.profile import Profile
    from moaplan.search import SearchSettings, candidate_plans

    shape = ModelShape(num_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    lengths = [1024, 2048, 4096]
    rng = np.random.default_rng(2)
    profile = Profile(model=shape, block=64, lengths=lengths, samples={n: 1 for n in lengths})
    decay = rng.uniform(0.01, 1.0, 32)  # per query head: the heads of a group differ
    for n in lengths:
        nblk = n // 64
        far = np.exp(-decay[:, None, None] * np.arange(nblk)[None, :, None]) * rng.random(
            (32, nblk, 2))
        profile.add(n, far, far[:, None] * rng.random((32, 1, 1, 1)), per_query_head=True)
    kv_only = SearchSettings(budget=Budget("kv", 0.5), lengths=lengths, validation_length=3072,
                             ablate=0)
    settings = SearchSettings(budget=Budget("kv", 0.5), lengths=lengths, validation_length=3072,
                              ablate=0, attention_budget=0.25)
    before = {name: plan for name, plan, _ in candidate_plans(profile, kv_only, np.ones(16),
                                                               list(range(16)))}
    after = {name: plan for name, plan, _ in candidate_plans(profile, settings, np.ones(16),
                                                              list(range(16)))}
    assert {"optimizer, query heads capped", "streaming, query heads capped"} <= set(after)
    targets = settings.target_lengths
    for name, plan in after.items():
        dens = plan.densities(targets)
        assert (dens["attention"].mean((0, 1)) <= 0.25 + 1e-12).all(), name
        source = before[name.removesuffix(", query heads capped")]
        np.testing.assert_array_equal(dens["kv"], source.densities(targets)["kv"])
    assert any(rule.query_windows is not None for rule in after["optimizer"].flat_rules)


def test_attention_budget_needs_a_kv_budget(checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(checkpoint)
    code = main(["search", "--budget", "0.5", "--density", "attention", "--attention-budget",
                 "0.3", "--model", str(checkpoint / "model"), "--data",
                 str(checkpoint / "calib.jsonl"), *SEARCH, "--out", "x.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "KV-budget search" in err


def test_search_with_an_attention_budget_writes_query_windows(checkpoint, monkeypatch):
    """``--attention-budget``: the plan meets the KV budget with its rules and the attention
    budget with its query heads' spans, and runs on the model."""
    monkeypatch.chdir(checkpoint)
    out = checkpoint / "attention.yaml"
    assert main(["search", "--budget", "0.5", "--attention-budget", "0.7", "--model",
                 str(checkpoint / "model"), "--data", str(checkpoint / "calib.jsonl"),
                 *SEARCH, "--out", str(out)]) == 0
    plan = load_plan(out)
    dens = plan.densities([256, 384, 512])
    assert (dens["kv"].mean((0, 1)) <= 0.5 + 1e-9).all()
    assert (dens["attention"].mean((0, 1)) <= 0.7 + 1e-9).all()
    search = plan.provenance["search"]
    assert search["attention_budget"] == 0.7
    assert "streaming, query heads capped" in search["candidates"]
    model, tokenizer = load_model(checkpoint / "model")
    moaplan.apply(model, out)
    ids = tokenizer("the key 3 is", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
