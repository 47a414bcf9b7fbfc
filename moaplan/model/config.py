"""Architecture of the reference model: a small byte-level Llama with grouped-query attention."""

from __future__ import annotations

from transformers import LlamaConfig

from moaplan.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

CONTEXT = 4096


def reference_config(**overrides: object) -> LlamaConfig:
    """8 layers x (8 query heads, 4 KV heads, head_dim 32), SwiGLU 768, 4K context: ~6.4M
    parameters, 12.9 MB in bf16.  ``overrides`` shrink it for tests."""
    fields: dict[str, object] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)
