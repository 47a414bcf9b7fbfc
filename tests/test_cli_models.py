"""The command line on models a user brings: a GGUF file the test writes itself (search,
baseline, generate, with --json for scripts), a model whose attention a plan cannot drive
(refused before any work), and --version."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from transformers import FalconConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

from moaplan import __version__
from moaplan.cli import main
from moaplan.plan import load_plan

gguf = pytest.importorskip("gguf")


def write_tiny_gguf(path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128, seed: int = 0) -> None:
    """A random Llama in llama.cpp's GGUF layout (float32 tensors) with a byte-level BPE
    tokenizer, as ``transformers`` reads it back with ``gguf_file=``."""
    rng = np.random.default_rng(seed)
    byte_tokens = list(bytes_to_unicode().values())
    merged = byte_tokens[ord("t")] + byte_tokens[ord("h")]
    tokens = ["<s>", "</s>", *byte_tokens, merged]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(1024)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # 3: control, 1: normal
    writer.add_token_merges([f"{byte_tokens[ord('t')]} {byte_tokens[ord('h')]}"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    head_dim = hidden // heads

    def weight(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32))

    weight("token_embd.weight", len(tokens), hidden)
    weight("output.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, np.float32))
        weight(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        weight(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        weight(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        weight(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        weight(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "model.gguf")
    rng = random.Random(0)
    words = "the cat sat on a mat and then the dog ran to the park where birds sing".split()
    (folder / "data.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return folder


def last_json(capsys) -> dict:
    """The JSON record a --json command printed last (a solver may print a banner before)."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_search_baseline_and_generate_on_a_gguf_file(gguf_dir, capsys, monkeypatch):
    monkeypatch.chdir(gguf_dir)
    model = str(gguf_dir / "model.gguf")
    assert main(["search", "--model", model, "--budget", "0.9", "--lengths", "128", "256",
                 "--samples", "1", "--validation-length", "192", "--validation-samples", "6",
                 "--candidates", "2", "--ablate", "0", "--data", "data.txt",
                 "--out", "searched.yaml", "--json"]) == 0
    record = last_json(capsys)
    assert record["model"]["kv_heads"] == 2 and record["kv_density"]["256"] <= 0.9
    assert record["chosen"] in {c["name"] for c in record["candidates"]}
    assert load_plan(gguf_dir / "searched.yaml").model.model_type == "llama"
    assert main(["baseline", "streaming", "--model", model, "--budget", "0.5", "--lengths",
                 "256", "--sink", "4", "--out", "streaming.yaml", "--json"]) == 0
    assert last_json(capsys)["kv_density"] == {"256": 0.5}
    assert main(["generate", "--model", model, "--plan", "streaming.yaml", "--prompt",
                 "the cat sat", "--max-new-tokens", "5", "--json"]) == 0
    record = last_json(capsys)
    assert record["new_tokens"] == 5 and record["cache_bytes"] < record["dense_cache_bytes"]


def test_a_model_a_plan_cannot_drive_is_refused_before_any_work(tmp_path, capsys):
    FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4
                 ).save_pretrained(tmp_path)
    for argv in (["baseline", "streaming", "--budget", "0.5", "--out", "x.yaml"],
                 ["search", "--budget", "0.5", "--out", "x.yaml"],
                 ["profile", "--lengths", "64"],
                 ["convert", "duo", "gates.tsv", "--out", "x.yaml"]):
        assert main([*argv, "--model", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "does not compute attention through" in err, argv
    assert not (tmp_path / "x.yaml").exists()


def test_model_arguments_and_version(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"moaplan {__version__}"
    assert main(["baseline", "streaming", "--budget", "0.5", "--out", "x.yaml",
                 "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "no GGUF file at" in capsys.readouterr().err
    assert main(["baseline", "streaming", "--budget", "0.5", "--out", "x.yaml",
                 "--model", str(tmp_path / "no" / "such" / "dir")]) == 2
    assert "expected a directory with config.json, a .gguf file or a Hugging Face hub id" in (
        capsys.readouterr().err)


def test_what_the_profiler_cannot_model_is_refused_before_any_work(tmp_path, capsys):
    from transformers import Gemma2Config, MistralConfig

    Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16
                 ).save_pretrained(tmp_path / "gemma2")
    MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, sliding_window=256
                  ).save_pretrained(tmp_path / "mistral")
    for model, reason in (("gemma2", "soft-caps its attention logits"),
                          ("mistral", "sliding window of 256 tokens")):
        assert main(["profile", "--model", str(tmp_path / model), "--lengths", "512"]) == 2
        assert reason in capsys.readouterr().err
