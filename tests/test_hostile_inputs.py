"""Hostile inputs and faults, one row each: every bad input gives status 2 and one line, never a
traceback, a hang or a memory blow-up; no failing command leaves a file behind or changes one
(every output path is checked before work); no command overwrites a file of another kind.

``CASES`` runs in this process through ``moaplan.cli.main`` (or the library call a user would
make) under a deadline; ``CAPPED`` runs the cases that used to eat memory or time in a
subprocess under ``RLIMIT_AS``.  Each row names the issue-18 item it covers, or ``own``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import BertConfig, BertLMHeadModel, LlamaConfig, LlamaForCausalLM

from moaplan.cli import main
from moaplan.errors import MoaplanError
from moaplan.model import byte_tokenizer
from moaplan.plan import Budget, ModelShape, load_plan, plan_to_dict, save_plan, uniform_plan
from moaplan.profile import Profile, load_profile, save_profile
from moaplan.profile.record import metadata_path
from moaplan.rules import Rule, RuleSpace
from moaplan.runtime import MoaplanCache, apply, kv_bytes, remove
from moaplan.runtime.cache import cache_keyword

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = 512
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=259, max_position_embeddings=POSITIONS,
            bos_token_id=256, eos_token_id=257, pad_token_id=258)
DEADLINE_S = 60  # per in-process case: a hang fails the row instead of the whole run
MEMORY_CAP = 4 * 2**30  # address space of a capped case (an import of torch alone maps ~1.5 GiB)


def _save_model(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    byte_tokenizer(POSITIONS).save_pretrained(path)
    return path


def _profile(shape: ModelShape, fill: float | None = None) -> Profile:
    profile = Profile(model=shape, block=64, lengths=[256], samples={256: 1},
                      rule_space=RuleSpace(sinks=(64,), alphas=(64, 128), betas=(0.0, 0.25)))
    rng = np.random.default_rng(0)
    far, sink = (rng.uniform(size=profile.far_sum[256].shape),
                 rng.uniform(size=profile.sink_sum[256].shape))
    if fill is not None:
        far[:], sink[:] = fill, fill
    profile.add(256, far, sink)
    return profile


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """Inputs every case may read: a tiny Llama (512 positions), a plan and profiles for it,
    and broken models.  Cases must not change anything here."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    model_dir = _save_model(LlamaForCausalLM(LlamaConfig(**TINY)), root / "model")
    config = LlamaConfig.from_pretrained(model_dir)
    shape = ModelShape.from_config(config)
    plan = save_plan(uniform_plan(shape, Budget("kv", 0.5), [256, 512]), root / "plan.yaml")
    other = LlamaConfig(**{**TINY, "rope_theta": 1234.0})  # same shape, other fingerprint
    other_plan = save_plan(uniform_plan(ModelShape.from_config(other), Budget("kv", 0.5),
                                        [256]), root / "other-model-plan.yaml")
    wide = save_plan(uniform_plan(ModelShape(3, 4, 2, 8), Budget("kv", 0.5), [256]),
                     root / "wrong-shape-plan.yaml")
    profiles = {name: save_profile(_profile(shape, fill), root / f"{name}.safetensors")
                for name, fill in (("good", None), ("nan", float("nan")), ("negative", -1.0))}
    legacy = save_profile(_profile(shape), root / "legacy.safetensors")
    metadata_path(legacy).rename(legacy.with_suffix(".yaml"))  # as moaplan < 0.2 named it
    bert = BertLMHeadModel(BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=POSITIONS))
    bert_dir = _save_model(bert, root / "bert")
    truncated = root / "truncated"
    shutil.copytree(model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_tokenizer = root / "no-tokenizer"  # the config names a fast tokenizer, no file has it
    shutil.copytree(model_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    bad_tokenizer = root / "bad-tokenizer"
    shutil.copytree(model_dir, bad_tokenizer)
    (bad_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    data = root / "data"
    data.mkdir()
    (data / "short.jsonl").write_text("".join(
        json.dumps({"prompt": f"what is {i}?", "response": "twelve"}) + "\n" for i in range(8)))
    (data / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x81" * 64)
    (data / "binary.txt").write_bytes(b"abc \xff\xfe\x81 def")
    (data / "nested.jsonl").write_text("[" * 100_000 + "\n")
    (data / "gates-nan.tsv").write_text("nan\tnan\nnan\tnan\n")
    (data / "moa.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    return SimpleNamespace(root=root, model=str(model_dir), config=config, shape=shape,
                           plan=str(plan), other_plan=str(other_plan), wide_plan=str(wide),
                           profiles={k: str(v) for k, v in profiles.items()},
                           legacy=str(legacy), bert=str(bert_dir), truncated=str(truncated),
                           no_tokenizer=str(no_tokenizer), bad_tokenizer=str(bad_tokenizer),
                           data=data)


def _plan_text(world: SimpleNamespace, edit: Callable[[dict], Any] | None = None,
               text: str | bytes | None = None) -> str:
    """A plan file in the current directory: the world's plan changed by ``edit`` (given the
    parsed dict), or ``text`` as it is."""
    path = Path(f"hostile-{len(list(Path().glob('hostile-*')))}.yaml")
    if text is None:
        data = plan_to_dict(load_plan(world.plan))
        edit(data)
        text = yaml.safe_dump(data, sort_keys=False)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit that sets the dotted ``path`` (list indices as numbers) of a plan dict."""
    def edit(data: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for key in parents:
            data = data[key]
        data[last] = value
    return edit


def _file(name: str, content: bytes | str = b"") -> str:
    """A file of the user's in the current directory (that no command may overwrite)."""
    path = Path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return name


def _dir(name: str) -> str:
    Path(name).mkdir(parents=True, exist_ok=True)
    return name


@dataclass(frozen=True)
class Case:
    """One hostile input: ``make(world)`` prepares files in the current directory and returns
    the CLI arguments, or a callable (a library call) that must raise a MoaplanError."""

    name: str
    make: Callable[[SimpleNamespace], list[str] | Callable[[], Any]]
    expect: str  # a regular expression the one-line message must match
    covers: str = "own"  # the item, or own
    marks: tuple = field(default_factory=tuple)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _library_cache(world, **kwargs) -> Callable[[], Any]:
    plan = load_plan(world.plan)
    args = {"plan": plan, "batch_size": 1, "max_length": 64, **kwargs}
    return lambda: MoaplanCache(args.pop("plan"), args.pop("batch_size"), args.pop("max_length"),
                                **args)


def _bf16_model_with_default_cache(world) -> Callable[[], Any]:
    from moaplan.model import load_model

    def run() -> None:
        model, _ = load_model(world.model, dtype=torch.bfloat16)
        apply(model, world.plan)
        cache = MoaplanCache(load_plan(world.plan), 1, 64)  # float32 by default
        model(torch.tensor([[256, 1, 2, 3]]), use_cache=True, **{cache_keyword(model): cache})
    return run


def _generate_twice(world, second_plan: bool) -> Callable[[], Any]:
    from moaplan.model import load_model

    def run() -> None:
        model, _ = load_model(world.model)
        apply(model, world.plan)
        plan = load_plan(world.plan)
        if second_plan:
            plan = uniform_plan(world.shape, Budget("kv", 0.9), [256, 512])
        cache = MoaplanCache(plan, 1, 64)
        try:
            model.generate(torch.tensor([[256, 10, 11, 12]]), **{cache_keyword(model): cache},
                           max_new_tokens=3, do_sample=False)
            # A new prompt into the used cache, without cache.reset()
            model.generate(torch.tensor([[256, 40, 41, 42, 43, 44, 45, 46, 47]]),
                           **{cache_keyword(model): cache}, max_new_tokens=3, do_sample=False)
        finally:
            remove(model)
    return run


SEARCH = ["search", "--budget", "0.5", "--lengths", "256", "--validation-length", "384",
          "--samples", "1", "--validation-samples", "4", "--candidates", "1", "--ablate", "0"]


def _search(world, *extra: str) -> list[str]:
    return [*SEARCH, "--model", world.model, *extra]


CASES = [
    # --- plan files (show reads them first) ----------------------------------------------
    Case("plan-alias", lambda w: ["show", _plan_text(w, text="format: moaplan/1\nrules: &a "
                                                     "[[full]]\nx: *a\n")], "aliases", "3"),
    Case("plan-duplicate-keys", lambda w: ["show", _plan_text(
        w, text=Path(w.plan).read_text() + "lengths: [1, 2]\n")], "duplicate key 'lengths'", "5"),
    Case("plan-model-type-list", lambda w: ["show", _plan_text(w, _set("model.model_type",
                                                                       [1, 2]))],
         "model_type must be a string", "5"),
    Case("plan-lengths-unsorted", lambda w: ["show", _plan_text(w, _set("lengths", [512, 256]))],
         "must increase strictly", "5"),
    Case("plan-lengths-repeated", lambda w: ["show", _plan_text(w, _set("lengths", [256, 256]))],
         "must increase strictly", "5"),
    Case("plan-beta-1e308", lambda w: ["show", _plan_text(w, _set("rules.0.0.beta", 1e308))],
         r"rules\[0\]\[0\]\.beta must be in \[0, 1048576\]", "2"),
    Case("plan-alpha-1e308", lambda w: ["show", _plan_text(w, _set("rules.0.0.alpha", 1e308))],
         r"alpha must be in \[-2147483648, 2147483648\]", "2"),
    Case("plan-sink-1e30", lambda w: ["show", _plan_text(w, _set("rules.0.0.sink", 10**30))],
         "sink must be in", "2"),
    Case("plan-predicted-key", lambda w: ["show", _plan_text(w, _set("predicted.abc", {
        "dropped_influence": 0.1}))], "'predicted' keys must be lengths", "6"),
    Case("plan-not-utf8", lambda w: ["show", _plan_text(w, text=b"format: \xff\xfe\x00")],
         "not UTF-8", "6"),
    Case("plan-empty", lambda w: ["show", _plan_text(w, text="")], "not a moaplan plan"),
    Case("plan-directory", lambda w: ["show", _dir("plan-dir.yaml")], "not a file"),
    Case("plan-missing", lambda w: ["show", "no-such-plan.yaml"], "does not exist"),
    Case("plan-format-2", lambda w: ["show", _plan_text(w, _set("format", "moaplan/2"))],
         "unsupported plan format"),
    Case("plan-python-tag", lambda w: ["show", _plan_text(
        w, text="!!python/object/apply:os.system ['true']\n")], "not valid YAML"),
    Case("plan-sink-negative", lambda w: ["show", _plan_text(w, _set("rules.0.1.sink", -1))],
         "sink must be >= 0"),
    Case("plan-alpha-nan", lambda w: ["show", _plan_text(w, _set("rules.0.0.alpha",
                                                                 float("nan")))],
         "alpha must be a number"),
    Case("plan-min-span-0", lambda w: ["show", _plan_text(w, _set("rules.1.0.min_span", 0))],
         "min_span must be >= 1"),
    Case("plan-budget-2", lambda w: ["show", _plan_text(w, _set("budget.value", 2))],
         r"budget.value must be in \(0, 1\]"),
    Case("plan-layers-missing", lambda w: ["show", _plan_text(w, _set("rules", [["full"] * 2]))],
         "'rules' has 1 layers"),
    Case("plan-fingerprint-list", lambda w: ["show", _plan_text(w, _set("model.fingerprint",
                                                                        [1]))],
         "fingerprint must be a string"),
    Case("plan-length-1e30", lambda w: ["show", _plan_text(w, _set("lengths", [10**30]))],
         r"lengths\[0\] must be <="),
    Case("plan-top-level-list", lambda w: ["show", _plan_text(w, text="- 1\n- 2\n")],
         "not a moaplan plan"),
    Case("plan-bad-yaml", lambda w: ["show", _plan_text(w, text="format: [moaplan/1\n")],
         r"not valid YAML \(line 2\)"),
    Case("plan-sparse-200mb", lambda w: ["show", _sparse("huge.yaml", 200 * 2**20)],
         "200.0 MiB", "5"),
    # --- show ----------------------------------------------------------------------------
    Case("show-png-into-directory", lambda w: ["show", w.plan, "--png", _dir("pics") + "/"],
         "is a directory", "4"),
    Case("show-png-under-a-file", lambda w: ["show", w.plan, "--png",
                                             _file("notes.txt", "mine") + "/x.png"],
         "not a directory", "4"),
    Case("show-png-over-a-text-file", lambda w: ["show", w.plan, "--png",
                                                 _file("essay.png", "my essay")],
         "is not a picture; moaplan will not overwrite it"),
    Case("show-nan-profile", lambda w: ["show", w.profiles["nan"], "--png", "p.png"],
         "NaN, infinite or negative", "5"),
    Case("show-negative-profile", lambda w: ["show", w.profiles["negative"], "--png", "p.png"],
         "NaN, infinite or negative", "5"),
    Case("show-profile-broken-metadata", lambda w: ["show", _broken_metadata(w), "--png",
                                                    "p.png"], "not valid YAML", "7"),
    Case("show-profile-negative-count", lambda w: ["show", _edited_metadata(
        w, finished={256: -5}), "--png", "p.png"], "negative sample counts"),
    Case("show-profile-nan-head-scores", lambda w: ["show", _edited_metadata(
        w, head_scores={"retrieval": [[float("nan")] * 2 for _ in range(2)]}), "--png",
        "p.png"],
         "NaN or infinite head scores"),
    Case("show-profile-metadata-not-a-mapping", lambda w: ["show", _edited_metadata(
        w, samples=[1]), "--png", "p.png"], "is malformed"),
    Case("show-profile-truncated-tensors", lambda w: ["show", _truncated_profile(w), "--png",
                                                      "p.png"], "does not match"),
    # --- baseline ------------------------------------------------------------------------
    Case("baseline-out-directory", lambda w: ["baseline", "streaming", "--budget", "0.5",
                                              "--model", w.model, "--out", _dir("o") + "/"],
         "is a directory", "4"),
    Case("baseline-out-over-profile-metadata", lambda w: [
        "baseline", "streaming", "--budget", "0.5", "--model", w.model, "--lengths", "256",
        "--out", _copy(w.legacy.replace(".safetensors", ".yaml"), "run.yaml")],
         "not a plan file; moaplan will not overwrite", "1"),
    Case("baseline-duo-nan-profile", lambda w: [
        "baseline", "duo", "--budget", "0.5", "--model", w.model, "--lengths", "256",
        "--samples", "1", "--profile", w.profiles["nan"], "--out", "duo.yaml"],
         "NaN, infinite or negative", "5"),
    Case("baseline-sink-negative", lambda w: ["baseline", "streaming", "--budget", "0.5",
                                              "--sink", "-5", "--out", "s.yaml"],
         "expected a number >= 0"),
    Case("baseline-budget-nan", lambda w: ["baseline", "streaming", "--budget", "nan",
                                           "--out", "s.yaml"], r"a density is in \(0, 1\]"),
    Case("baseline-lengths-past-positions", lambda w: [
        "baseline", "streaming", "--budget", "0.5", "--model", w.model, "--lengths", "256",
        "100000", "--out", "s.yaml"], "100000 tokens is more than the model's 512", "3"),
    # --- convert -------------------------------------------------------------------------
    Case("convert-duo-gates-nan", lambda w: ["convert", "duo", str(w.data / "gates-nan.tsv"),
                                             "--shape", "2,4,2,8", "--out", "d.yaml"],
         "NaN", "5"),
    Case("convert-threshold-nan", lambda w: ["convert", "duo", str(w.data / "gates-nan.tsv"),
                                             "--shape", "1,4,2,8", "--threshold", "nan",
                                             "--out", "d.yaml"], "finite number", "5"),
    Case("convert-shape-zero", lambda w: ["convert", "moa", "x.json", "--shape", "0,0,0,0",
                                          "--out", "d.yaml"], "positive numbers"),
    Case("convert-moa-binary", lambda w: ["convert", "moa", str(w.data / "moa.json"),
                                          "--shape", "2,2,2,8", "--out", "d.yaml"],
         "moa.json"),
    Case("convert-out-over-json", lambda w: ["convert", "duo", str(w.data / "gates-nan.tsv"),
                                             "--shape", "1,4,2,8", "--out",
                                             _file("results.json", '{"mine": 1}')],
         "not a plan file; moaplan will not overwrite", "1"),
    Case("convert-sparsity-huge", lambda w: ["convert", "duo", _file("g.tsv", "1\t0\n"),
                                             "--shape", "1,4,2,8", "--sparsity", "7",
                                             "--out", "d.yaml"], "sparsity"),
    # --- search --------------------------------------------------------------------------
    Case("search-out-directory", lambda w: _search(w, "--out", _dir("plans") + "/"),
         "is a directory", "4"),
    Case("search-out-over-legacy-profile-metadata", lambda w: _search(
        w, "--profile", _copy_profile(w.legacy, "x/run.safetensors"), "--out", "x/run.yaml"),
         "x/run.yaml exists and is not a plan file", "1"),
    Case("search-time-limit-negative", lambda w: _search(w, "--time-limit", "-1"),
         "expected a positive number", "5"),
    Case("search-time-limit-nan", lambda w: _search(w, "--time-limit", "nan"),
         "expected a finite number", "5"),
    # three validation lengths (shortest, --validation-length, longest): six samples, so that
    # the length is what is refused
    Case("search-lengths-past-positions", lambda w: _search(w, "--lengths", "256", "100000",
                                                            "--validation-samples", "6"),
         "100000 tokens is more than the model's 512", "3"),
    Case("search-validation-length-9e6", lambda w: _search(w, "--validation-length", "9000000"),
         "9000000 tokens is more than", "3"),
    Case("search-device-bogus", lambda w: _search(w, "--device", "bogus"),
         "'bogus' is not a torch device", "6"),
    Case("search-device-cuda", lambda w: _search(w, "--device", "cuda"),
         "this machine has 0 CUDA GPU", "6", (NO_CUDA,)),
    Case("search-bert", lambda w: [*SEARCH, "--model", w.bert], "not a causal", "5"),
    Case("search-truncated-weights", lambda w: [*SEARCH, "--model", w.truncated],
         "cannot load a causal LM", "6"),
    Case("search-missing-tokenizer", lambda w: [*SEARCH, "--model", w.no_tokenizer],
         "Couldn't instantiate the backend tokenizer from one of: .{20,}", "7"),
    Case("search-broken-tokenizer", lambda w: [*SEARCH, "--model", w.bad_tokenizer],
         "cannot load a causal LM from .*bad-tokenizer: .+"),
    Case("search-data-binary-jsonl", lambda w: _search(w, "--data",
                                                       str(w.data / "binary.jsonl")),
         "not UTF-8", "6"),
    Case("search-data-nested-jsonl", lambda w: _search(w, "--data", str(w.data / "nested.jsonl")),
         "expected a JSON object", "6"),
    Case("search-data-short-records", lambda w: _search(w, "--data",
                                                        str(w.data / "short.jsonl")),
         "0 records of 193 to 256 tokens", "5"),
    Case("search-profile-not-safetensors", lambda w: _search(w, "--profile", "p.yaml"),
         "ends in .safetensors"),
    Case("search-extend-to-1e30", lambda w: _search(w, "--extend-to", str(10**30)),
         "expected at most 2147483648"),
    Case("search-budget-zero", lambda w: _search(w, "--budget", "0"), r"\(0, 1\]"),
    Case("search-candidates-zero", lambda w: _search(w, "--candidates", "0"),
         "expected a number >= 1"),
    # --- profile -------------------------------------------------------------------------
    Case("profile-out-directory", lambda w: ["profile", "--model", w.model, "--lengths", "256",
                                             "--out", _dir("profiles.safetensors")],
         "is a directory", "4"),
    Case("profile-out-over-weights", lambda w: [
        "profile", "--model", w.model, "--lengths", "256",
        "--out", _copy(w.model + "/model.safetensors", "weights.safetensors")],
         "not a profile; moaplan will not overwrite", "1"),
    Case("profile-metadata-over-a-user-file", lambda w: _profile_beside_notes(w),
         "run.profile.yaml exists and is not a profile metadata file", "1"),
    Case("profile-out-not-safetensors", lambda w: ["profile", "--lengths", "256", "--out",
                                                   "p.npz"], "ends in .safetensors"),
    Case("profile-short-jsonl", lambda w: ["profile", "--model", w.model, "--lengths", "256",
                                           "--data", str(w.data / "short.jsonl"),
                                           "--out", "p.safetensors"],
         "0 records of 193 to 256 tokens", "5"),
    Case("profile-lengths-past-positions", lambda w: [
        "profile", "--model", w.model, "--lengths", "256", "100000", "--out", "p.safetensors"],
         "100000 tokens is more than", "3"),
    Case("profile-bert", lambda w: ["profile", "--model", w.bert, "--lengths", "256", "--out",
                                    "p.safetensors"], "not a causal", "5"),
    Case("profile-block-huge", lambda w: ["profile", "--model", w.model, "--lengths", "256",
                                          "--block", "1000", "--out", "p.safetensors"],
         "not a multiple of the block size"),
    # --- eval ----------------------------------------------------------------------------
    Case("eval-out-directory", lambda w: ["eval", "--task", "ppl", "--model", w.model,
                                          "--out", _dir("res")], "is a directory", "4"),
    Case("eval-out-over-plan", lambda w: ["eval", "--task", "ppl", "--model", w.model,
                                          "--out", _copy(w.plan, "mine.yaml")],
         "not a eval result file; moaplan will not overwrite", "1"),
    Case("eval-lengths-1e6", lambda w: ["eval", "--task", "passkey", "--model", w.model,
                                        "--lengths", "1000000"], "1000000 tokens is more", "3"),
    Case("eval-plan-other-model", lambda w: ["eval", "--task", "ppl", "--model", w.model,
                                             "--plan", w.other_plan, "--lengths", "256"],
         "made for another llama .* pass --force", "7"),
    Case("eval-plan-wrong-shape", lambda w: ["eval", "--task", "ppl", "--model", w.model,
                                             "--plan", w.wide_plan, "--force", "--lengths",
                                             "256"],
         "the plan is for a model with 3 layers"),
    Case("eval-device-bogus", lambda w: ["eval", "--task", "ppl", "--model", w.model,
                                         "--device", "bogus"], "not a torch device", "6"),
    Case("eval-batch-zero", lambda w: ["eval", "--task", "ppl", "--batch-size", "0"],
         "expected a number >= 1"),
    Case("eval-depth-2", lambda w: ["eval", "--task", "kv", "--depths", "2"],
         r"needle depth is in \[0, 1\]"),
    # --- generate ------------------------------------------------------------------------
    Case("generate-prompt-binary", lambda w: ["generate", "--plan", w.plan, "--model", w.model,
                                              "--prompt-file", str(w.data / "binary.txt")],
         "not UTF-8", "6"),
    Case("generate-prompt-directory", lambda w: ["generate", "--plan", w.plan, "--model",
                                                 w.model, "--prompt-file", _dir("prompts")],
         "not a file"),
    Case("generate-max-new-tokens-past-positions", lambda w: [
        "generate", "--plan", w.plan, "--model", w.model, "--prompt", "hi",
        "--max-new-tokens", "5000"], "5003 tokens is more than the model's 512", "5"),
    Case("generate-device-cuda", lambda w: ["generate", "--plan", w.plan, "--model", w.model,
                                            "--prompt", "hi", "--device", "cuda"],
         "0 CUDA GPU", "6", (NO_CUDA,)),
    Case("generate-device-bogus", lambda w: ["generate", "--plan", w.plan, "--model", w.model,
                                             "--prompt", "hi", "--device", "bogus"],
         "not a torch device", "6"),
    Case("generate-plan-other-model", lambda w: ["generate", "--plan", w.other_plan,
                                                 "--model", w.model, "--prompt", "hi"],
         "pass --force", "7"),
    Case("generate-plan-is-a-profile", lambda w: ["generate", "--plan", w.profiles["good"],
                                                  "--model", w.model, "--prompt", "hi"],
         "not UTF-8|not a moaplan plan"),
    # --- influence, compare-scorers ------------------------------------------------------
    Case("influence-heads-1000", lambda w: ["influence", "--data", str(w.data / "short.jsonl"),
                                            "--model", w.model, "--heads", "1000",
                                            "--length", "256", "--out", "i.jsonl"],
         "--heads 1000 is more than the model's 4 KV heads", "5"),
    Case("influence-out-directory", lambda w: ["influence", "--data",
                                               str(w.data / "short.jsonl"), "--heads", "1",
                                               "--out", _dir("scores") + "/"],
         "is a directory", "4"),
    Case("influence-out-over-plan", lambda w: ["influence", "--data",
                                               str(w.data / "short.jsonl"), "--heads", "1",
                                               "--out", _copy(w.plan, "keep.yaml")],
         "will not overwrite", "1"),
    Case("influence-data-binary", lambda w: ["influence", "--data",
                                             str(w.data / "binary.jsonl"), "--model", w.model,
                                             "--heads", "1", "--out", "i.jsonl",
                                             "--length", "256", "--score-lengths", "256"],
         "not UTF-8", "6"),
    Case("influence-length-past-positions", lambda w: [
        "influence", "--data", str(w.data / "short.jsonl"), "--model", w.model, "--heads", "1",
        "--out", "i.jsonl"], "--length: 4096 tokens is more than the model's 512", "3"),
    Case("compare-scorers-top-1000", lambda w: ["compare-scorers", "--profiles",
                                                w.profiles["good"], "--top", "1000"],
         "top 1000 of 4 KV heads", "5"),
    Case("compare-scorers-nan-profile", lambda w: ["compare-scorers", "--profiles",
                                                   w.profiles["nan"]], "NaN", "5"),
    Case("compare-scorers-top-model", lambda w: ["compare-scorers", "--model", w.model,
                                                 "--top", "1000"], "more than the model's 4",
         "5"),
    Case("unknown-command", lambda w: ["frobnicate"], "invalid choice"),
    # --- the library ---------------------------------------------------------------------
    Case("lib-load-plan-none", lambda w: lambda: load_plan(None), "takes the path", "6"),
    Case("lib-cache-plan-is-a-number", lambda w: _library_cache(w, plan=3),
         "expected a moaplan Plan or the path", "6"),
    Case("lib-cache-batch-string", lambda w: _library_cache(w, batch_size="2"),
         "batch_size must be a whole number", "6"),
    Case("lib-cache-max-length-float", lambda w: _library_cache(w, max_length=100.5),
         "max_length must be a whole number", "8"),
    Case("lib-cache-dtype-not-a-dtype", lambda w: _library_cache(w, dtype="bf16"),
         "dtype must be a floating torch dtype"),
    Case("lib-cache-dtype-of-a-bf16-model", lambda w: _bf16_model_with_default_cache(w),
         "dtype=model.dtype", "8"),
    Case("lib-cache-reused-without-reset", lambda w: _generate_twice(w, second_plan=False),
         r"call cache.reset\(\)", "8"),
    Case("lib-cache-of-another-plan", lambda w: _generate_twice(w, second_plan=True),
         "made for another plan", "8"),
    Case("lib-rule-beta-overflow", lambda w: lambda: Rule(beta=1e308), "beta must be in", "2"),
    Case("lib-rule-sink-overflow", lambda w: lambda: Rule(sink=10**30), "sink must be in", "2"),
    Case("lib-kv-bytes-length-float", lambda w: lambda: kv_bytes(load_plan(w.plan), w.config,
                                                                 100.5),
         "length must be a whole number"),
    Case("lib-load-profile-missing-metadata", lambda w: _load_lone_profile(w),
         "it needs lone.safetensors and lone.profile.yaml"),
]


def _load_lone_profile(world) -> Callable[[], Any]:
    name = _copy(world.profiles["good"], "lone.safetensors")
    return lambda: load_profile(name)


def _profile_beside_notes(world) -> list[str]:
    _file("run.profile.yaml", "my notes")
    return ["profile", "--model", world.model, "--lengths", "256", "--out", "run.safetensors"]


def _sparse(name: str, size: int) -> str:
    with open(name, "wb") as f:
        f.truncate(size)  # no disk used: the size alone must stop the reader
    return name


def _copy(source: str, name: str) -> str:
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, name)
    return name


def _copy_profile(source: str, name: str) -> str:
    """Copy a profile and whichever metadata file it has (legacy ``NAME.yaml`` included)."""
    _copy(source, name)
    for meta in (metadata_path(source), Path(source).with_suffix(".yaml")):
        if meta.is_file():
            _copy(str(meta), str(Path(name).with_name(Path(name).stem + meta.name[
                len(Path(source).stem):])))
    return name


def _broken_metadata(world) -> str:
    name = _copy_profile(world.profiles["good"], "broken.safetensors")
    metadata_path(name).write_text("format: moaplan-profile/1\nblock: [64\nlengths: {\n")
    return name


def _edited_metadata(world, **changes: Any) -> str:
    name = _copy_profile(world.profiles["good"], "edited.safetensors")
    meta = yaml.safe_load(metadata_path(name).read_text())
    metadata_path(name).write_text(yaml.safe_dump({**meta, **changes}))
    return name


def _truncated_profile(world) -> str:
    name = _copy_profile(world.profiles["good"], "cut.safetensors")
    Path(name).write_bytes(Path(name).read_bytes()[:100])
    return name


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``roots`` with its size, mtime and mode: a failing command must leave
    all of them as they were (no stray file, no overwritten file)."""
    return {str(p): (s.st_size, s.st_mtime_ns, s.st_mode)
            for root in roots for p in sorted(root.rglob("*")) for s in [p.lstat()]}


def assert_one_line_error(code: Any, err: str, expect: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert re.search(expect, err), err


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_hostile_input(case: Case, world, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    made = case.make(world)
    before = _snapshot(tmp_path, world.root)
    with _deadline(DEADLINE_S):
        if callable(made):
            try:
                made()
                code, err = 0, "no error\n"
            except MoaplanError as error:
                code, err = 2, f"{error}\n"
        else:
            try:
                code = main(made)
            except SystemExit as exit_:
                code = exit_.code
            err = capsys.readouterr().err
    assert_one_line_error(code, err, case.expect)
    assert _snapshot(tmp_path, world.root) == before


def test_the_table_is_long_enough() -> None:
    assert len(CASES) + len(CAPPED) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


# --- cases that once ate memory or time: a subprocess under RLIMIT_AS and a timeout --------

_CAPPED_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
{body}
"""
_CLI = "from moaplan.cli import main\nsys.exit(main(sys.argv[1:]))"
_HUGE_CACHE = """
from moaplan.errors import MoaplanError
from moaplan.plan import load_plan
from moaplan.runtime import MoaplanCache
try:
    MoaplanCache(load_plan(sys.argv[1]), 1, int(sys.argv[2]))
except MoaplanError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def _alias_bomb() -> str:
    lines = ["format: moaplan/1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return _plan_text(None, text="\n".join(lines + ["rules: *a9", ""]))


CAPPED = [
    Case("capped-alias-bomb", lambda w: ["show", _alias_bomb()], "aliases", "3"),
    Case("capped-nested-brackets", lambda w: ["show", _plan_text(w, text="[" * 100_000)],
         "nested deeper than 64", "6"),
    Case("capped-prompt-file-30mb", lambda w: [
        "generate", "--plan", w.plan, "--model", w.model,
        "--prompt-file", _file("prompt.txt", b"All work and no play. " * 1_400_000)],
         r"at most 0.03 MiB", "3"),
    Case("capped-cache-1e12", lambda w: ["-", w.plan, str(10**12)],
         r"max_length must be in \[1, 2147483648\]", "3"),
    Case("capped-cache-2e9", lambda w: ["-", w.plan, str(2**31)], "needs .* GiB but cpu has",
         "3"),
    Case("capped-search-lengths-100000", lambda w: _search(w, "--lengths", "256", "100000",
                                                           "--validation-samples", "6"),
         "more than the model's 512 positions", "3"),
    Case("capped-eval-lengths-1e6", lambda w: ["eval", "--task", "passkey", "--model", w.model,
                                               "--lengths", "1000000"], "more than", "3"),
    Case("capped-validation-length-9e6", lambda w: _search(w, "--validation-length",
                                                           "9000000"), "more than", "3"),
    Case("capped-plan-sparse-200mb", lambda w: ["show", _sparse("big.yaml", 200 * 2**20)],
         "MiB", "5"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CAPPED])
def test_capped_hostile_input(case: Case, world, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = case.make(world)
    body = _HUGE_CACHE if argv[0] == "-" else _CLI
    child = _CAPPED_CHILD.format(cap=MEMORY_CAP, body=body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TRANSFORMERS_VERBOSITY": "error"}
    before = _snapshot(tmp_path, world.root)
    done = subprocess.run([sys.executable, "-c", child, *argv[argv[0] == "-":]],
                          capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(done.returncode, done.stderr, case.expect)
    assert _snapshot(tmp_path, world.root) == before


# --- documented behaviour: what is accepted, and how files are written ---------------------

def test_a_profile_whose_head_scores_share_rows_is_written_without_aliases(world, tmp_path):
    profile = _profile(world.shape)
    row = [0.5, 0.25]
    profile.head_scores = {"retrieval": [row, row], "echo": [row, row]}
    back = load_profile(save_profile(profile, tmp_path / "shared.safetensors"))
    assert back.head_scores == profile.head_scores


def test_an_old_profile_with_its_metadata_in_name_yaml_is_still_read(world) -> None:
    profile = load_profile(world.legacy)
    assert profile.lengths == [256] and profile.finished == {256: 1}


def test_a_profile_beside_a_plan_of_the_same_name_leaves_the_plan_alone(world, tmp_path):
    plan = _copy(world.plan, str(tmp_path / "myplan.yaml"))
    text = Path(plan).read_text()
    save_profile(_profile(world.shape), tmp_path / "myplan.safetensors")
    assert Path(plan).read_text() == text
    assert load_plan(plan).model == load_plan(world.plan).model
    assert (tmp_path / "myplan.profile.yaml").is_file()


def test_plans_profiles_and_results_follow_the_umask(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o027)
    try:
        save_plan(load_plan(world.plan), "plan.yaml")
        save_profile(_profile(world.shape), "p.safetensors")
        assert main(["convert", "duo", _file("g.tsv", "1\t0\n"), "--shape", "1,4,2,8",
                     "--out", "duo.yaml"]) == 0
    finally:
        os.umask(old)
    for name in ("plan.yaml", "p.safetensors", "p.profile.yaml", "duo.yaml"):
        assert Path(name).stat().st_mode & 0o777 == 0o640, name
    Path("plan.yaml").chmod(0o604)  # an existing file keeps its mode
    save_plan(load_plan(world.plan), "plan.yaml")
    assert Path("plan.yaml").stat().st_mode & 0o777 == 0o604


def test_force_uses_a_plan_of_another_model_of_the_same_shape(world, capsys) -> None:
    assert main(["generate", "--plan", world.other_plan, "--model", world.model, "--prompt",
                 "hi", "--max-new-tokens", "2", "--force"]) == 0
    assert "-- 2 new tokens" in capsys.readouterr().out


def test_a_reset_cache_takes_a_new_prompt_and_a_continued_one_is_fine(world) -> None:
    from moaplan.model import load_model

    model, _ = load_model(world.model)
    apply(model, world.plan)
    cache = MoaplanCache(world.plan, 1, 64)  # a plan's path is taken for the plan
    first = model.generate(torch.tensor([[256, 10, 11, 12]]), **{cache_keyword(model): cache},
                           max_new_tokens=3, do_sample=False)
    # the whole conversation so far plus a new turn continues the cache
    more = torch.cat([first, torch.tensor([[13, 14]])], 1)
    model.generate(more, **{cache_keyword(model): cache}, max_new_tokens=2, do_sample=False)
    cache.reset()
    model.generate(torch.tensor([[256, 40, 41]]), **{cache_keyword(model): cache},
                   max_new_tokens=2, do_sample=False)
    remove(model)



_KILLED_CHILD = """
import os, signal, sys, time
import moaplan.optimize.select as select
from moaplan.optimize.select import Candidate, measure, open_study
select._HEARTBEAT_S, select._GRACE_S = 1, 2
def evaluate(index, report):
    report(0, 1.0)
    time.sleep(1.5)  # a measurement long enough for its heartbeat to be recorded
    os.kill(os.getpid(), signal.SIGKILL)  # the worker dies measuring the first plan
measure([Candidate("a", "plan-a"), Candidate("b", "plan-b")], evaluate,
        study=open_study(sys.argv[1], "s"))
"""


def test_a_killed_measurement_is_not_counted_and_is_measured_again(tmp_path, monkeypatch):
    """SIGKILL mid-measurement leaves the trial RUNNING with a partial report; the next run
    measures that plan afresh, and once the dead trial's heartbeat is stale it is failed (and
    its re-queued copy takes the fresh score): it never counts as measured."""
    import optuna

    from moaplan.optimize import select
    from moaplan.optimize.select import Candidate, best_candidate, measure, open_study, scores

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run([sys.executable, "-c", _KILLED_CHILD, storage], env=env,
                            timeout=120, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    monkeypatch.setattr(select, "_HEARTBEAT_S", 1)
    monkeypatch.setattr(select, "_GRACE_S", 2)
    calls: list[int] = []

    def evaluate(index: int, report: Callable[[int, float], None]) -> tuple[float, dict]:
        calls.append(index)
        return 0.5 + index, {}

    time.sleep(3)  # the dead worker's heartbeat goes stale
    candidates = [Candidate("a", "plan-a"), Candidate("b", "plan-b")]
    study = measure(candidates, evaluate, study=open_study(storage, "s"))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert optuna.trial.TrialState.RUNNING not in states
    assert sorted(calls) == [0, 1]  # plan a measured afresh, once
    assert {i: s[:2] for i, s in scores(study).items()} == {0: ("complete", 0.5),
                                                             1: ("complete", 1.5)}
    assert best_candidate(study) == 0
