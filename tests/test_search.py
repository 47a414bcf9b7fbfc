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
    chosen = search["candidates"][search["chosen"]]["kl"]
    assert chosen <= min(c["kl"] for c in search["candidates"].values()
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


def test_ablation_correction_rescales_the_measured_heads_only():
    from moaplan.plan import Budget, ModelShape
    from moaplan.profile import Profile
    from moaplan.search import SearchSettings, correction_factors, protection_order

    shape = ModelShape(num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    rng = np.random.default_rng(0)
    profile = Profile(model=shape, block=64, lengths=[1024], samples={1024: 1})
    profile.add(1024, rng.random((4, 16, 2)), rng.random((4, 1, 16, 2)))
    settings = SearchSettings(budget=Budget("kv", 0.5), lengths=[1024], validation_length=768)
    share = profile.dropped_share(moaplan.plan.uniform_rule(settings.budget,
                                                            settings.target_lengths))
    # Head 2 loses ten times what its share predicts relative to head 0.
    measured = {0: float(share[0]), 2: float(10 * share[2])}
    factors = correction_factors(profile, settings, measured)
    assert factors[1] == factors[3] == 1.0  # not measured: unchanged
    assert factors[2] / factors[0] == pytest.approx(10.0)
    assert protection_order(profile, settings, measured)[:2] == [2, 0]
