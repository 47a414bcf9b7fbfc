"""Tiny random causal LMs of many architecture families, and the independent oracle of a plan:
eager softmax attention under explicit per-head boolean masks built position by position."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tf
from transformers import AttentionInterface

from moaplan.plan import ModelShape, Plan
from moaplan.rules import Rule

VOCAB = 100
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
# Local layers get a native window shorter than the test inputs, so that the intersection of
# the model's window with the plan's rules is exercised.
WINDOW = 12
GEMMA = dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16)
# family: (config class, model class, config fields over SHAPE)
ARCHS = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=WINDOW)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(head_dim=16)),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               dict(GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               dict(GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM, {}),
    "gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, dict(num_key_value_heads=4)),
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {}),
    "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM, {}),
    "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {}),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_positions=256, num_key_value_heads=None)),
}


def tiny_model(arch: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls, fields = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SHAPE, **fields, **overrides})).eval()


def make_plan(model, rules) -> Plan:
    return Plan(ModelShape.from_config(model.config), rules)


def full_plan(model) -> Plan:
    shape = ModelShape.from_config(model.config)
    return make_plan(model, [[Rule.full_attention()] * shape.num_key_value_heads
                             for _ in range(shape.num_layers)])


def sparse_plan(model, seed: int, *, elastic: bool = True) -> Plan:
    """Different small rules per (layer, KV head); ``elastic`` adds length-dependent spans."""
    shape = ModelShape.from_config(model.config)
    rng = np.random.default_rng(seed)
    betas = (0.0, 0.25) if elastic else (0.0,)
    rules = [[Rule(sink=int(rng.integers(0, 4)), alpha=float(rng.integers(1, 6)),
                   beta=float(rng.choice(betas))) for _ in range(shape.num_key_value_heads)]
             for _ in range(shape.num_layers)]
    return make_plan(model, rules)


def ids_for(seed: int, batch: int, n: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def brute_force_logits(model, plan: Plan, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Logits with each layer's rules as explicit per-head masks, built by looping over
    positions; query row ``i`` uses the rule at length ``lengths[i]``.  Eager softmax attention
    that honours the scaling, soft-capping and sliding window the model passes, independent of
    moaplan's runtime."""
    n = ids.shape[1]
    masks = []
    for layer_rules in plan.rules:
        mask = torch.zeros(len(layer_rules), n, n, dtype=torch.bool)
        for h, rule in enumerate(layer_rules):
            sink = 0 if rule.full else rule.sink
            for i in range(n):
                span = int(rule.span(lengths[i]))
                for j in range(i + 1):
                    mask[h, i, j] = j < sink or i - j < span
        masks.append(mask)

    def masked_eager(module, query, key, value, attention_mask, scaling=None,
                     sliding_window=None, softcap=None, **_):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        mask = masks[module.layer_idx].repeat_interleave(group, 0)
        if sliding_window is not None:
            pos = torch.arange(n)
            mask = mask & (pos[:, None] - pos[None, :] < sliding_window)
        scores = (query @ key.transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), None

    previous = model.config._attn_implementation
    AttentionInterface.register("moaplan_test_brute_force", masked_eager)
    model.set_attn_implementation("moaplan_test_brute_force")
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)
