"""The reference model: tokenizer, architecture, shipped files, loading, training script."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, T5Config

from moaplan.errors import ModelError
from moaplan.model import byte_tokenizer, load_model, reference_config, reference_model_path
from moaplan.model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from moaplan.training.train import main as train_main

MAX_FILE_BYTES = 15 * 1024 * 1024


def test_byte_tokenizer_maps_each_byte_to_its_value(tmp_path):
    tok = byte_tokenizer()
    text = "héllo\n\tworld ∑ 0x7f"
    ids = tok(text)["input_ids"]
    assert ids == [BOS_ID, *text.encode()]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids


def test_reference_config_meets_the_requirements():
    c = reference_config()
    assert c.num_hidden_layers >= 6 and c.num_attention_heads >= 8 and c.head_dim >= 32
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention
    assert c.max_position_embeddings >= 4096 and c.hidden_act == "silu"


def test_shipped_model_files_fit_and_load_with_transformers():
    path = reference_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
                 "loss_curve.png", "summary.json"):
        assert (path / name).is_file(), name
    assert all(f.stat().st_size <= MAX_FILE_BYTES for f in path.iterdir())
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    shipped, code = model.config.to_dict(), reference_config().to_dict()
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings"):
        assert shipped[key] == code[key], key
    assert sum(p.numel() * 2 for p in model.parameters()) <= 20e6  # bf16 on disk


def test_shipped_dense_passkey_record_is_at_least_095_everywhere():
    summary = json.loads((reference_model_path() / "summary.json").read_text())
    cells = summary["dense_eval"]["passkey"]["cells"]
    assert {c["length"] for c in cells} >= {1024, 2048, 4096}
    assert min(c["accuracy"] for c in cells) >= 0.95


def test_load_model_gives_float32_eval_model():
    model, tokenizer = load_model()
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer("a")["input_ids"] == [BOS_ID, ord("a")]


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(ModelError, match="no model at"):
        load_model(tmp_path / "missing")
    T5Config(num_layers=1, d_model=8, d_ff=8, num_heads=1, d_kv=8).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="cannot load a causal LM") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_training_script_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "tiny"
    assert train_main(["--out", str(out), "--tiny", "--steps", "3", "--eval-samples", "1"]) == 0
    curve = json.loads((out / "loss_curve.json").read_text())["curve"]
    assert [p["step"] for p in curve] == [1, 2, 3]
    assert all(p["lm_loss"] > 0 for p in curve)
    card = (out / "MODEL_CARD.md").read_text()
    for heading in ("## Architecture", "## Data", "## Training", "## Dense evaluation"):
        assert heading in card
    model, _ = load_model(out)
    assert model.config.num_hidden_layers == 2
