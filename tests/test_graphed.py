"""greedy_generate: the same tokens as ``model.generate`` on a model with a plan, for a single
prompt, a left-padded batch and end-of-sequence stopping; eagerly on the CPU (the loop's
logic) and from a replayed CUDA graph on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_cache import CONFIG, generate, mixed_plan, prompt
from transformers import LlamaConfig, LlamaForCausalLM

from moaplan.errors import ModelError
from moaplan.runtime import MoaplanCache, apply, greedy_generate
from moaplan.runtime.apply import applied_plan


def _model(device: str, compensate: bool):
    torch.manual_seed(0)
    # head_dim 32: the GPU kernels' smallest.
    model = LlamaForCausalLM(LlamaConfig(**CONFIG | dict(hidden_size=128))).eval().to(device)
    return apply(model, mixed_plan(model.config, compensate))


def _left_padded(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [prompt(20 + i, n)[0] for i, n in enumerate((17, 5, 33))]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    return ids.to(device), mask.to(device)


def _check_matches_generate(device: str, compensate: bool, compile: bool = False) -> None:
    model = _model(device, compensate)
    ids, mask = _left_padded(device)
    expected = generate(model, ids, 16, mask=mask)  # generate through a MoaplanCache
    assert torch.equal(greedy_generate(model, ids, mask, max_new_tokens=16, compile=compile),
                       expected)
    single = prompt(4, 40).to(device)
    assert torch.equal(greedy_generate(model, single, max_new_tokens=9, compile=compile),
                       generate(model, single, 9))
    # End of sequence: a token the first sequence emits midway stops it (pad afterwards).
    eos = int(expected[0, ids.shape[1] + 5])
    with torch.no_grad():
        stopped = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)
    assert torch.equal(greedy_generate(model, ids, mask, max_new_tokens=16, eos_token_id=eos,
                                       pad_token_id=0, compile=compile), stopped)


@pytest.mark.parametrize("compensate", [False, True])
def test_eager_loop_matches_generate(compensate):
    _check_matches_generate("cpu", compensate)


def test_bad_input_is_a_clear_error():
    model = _model("cpu", False)
    with pytest.raises(ModelError, match="max_new_tokens"):
        greedy_generate(model, prompt(1, 5), max_new_tokens=0)
    with pytest.raises(ModelError, match="CUDA"):
        greedy_generate(model, prompt(1, 5), max_new_tokens=3, graph=True)
    with pytest.raises(ModelError, match="int64"):
        greedy_generate(model, prompt(1, 5).float(), max_new_tokens=3)
    with pytest.raises(ModelError, match="holds 7 tokens per sequence but generation needs 9"):
        greedy_generate(model, prompt(1, 5), max_new_tokens=5,
                        cache=MoaplanCache(applied_plan(model), 1, 7))
    used = MoaplanCache(applied_plan(model), 1, 64)
    greedy_generate(model, prompt(1, 5), max_new_tokens=2, cache=used)
    with pytest.raises(ModelError, match="empty MoaplanCache"):
        greedy_generate(model, prompt(1, 5), max_new_tokens=2, cache=used)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compensate,compile", [(False, False), (True, False), (False, True)],
                         ids=["plain", "compensate", "compiled"])
def test_graph_replays_match_generate(compensate, compile):
    """With ``compile``, the decoder layers are compiled by inductor around the replays."""
    _check_matches_generate("cuda", compensate, compile)
