"""compiled_layers: a model's decoder layers compiled by torch.compile around moaplan's eager
attention and cache give the same decode as the model uncompiled, and the model is left as it
was.  On the CPU with the ``aot_eager`` backend (dynamo's tracing and graph breaks, no code
generation); on a GPU, greedy_generate(compile=True) with inductor (test_graphed)."""

from __future__ import annotations

import functools

import pytest
import torch
from test_cache import CONFIG, mixed_plan, prompt
from transformers import LlamaConfig, LlamaForCausalLM

from moaplan.errors import ModelError
from moaplan.runtime import MoaplanCache, apply
from moaplan.runtime.apply import applied_plan
from moaplan.runtime.cache import cache_keyword
from moaplan.runtime.compiled import compiled_layers, decoder_layers


def _decode_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits of a prefill and ``steps`` greedy decode steps through a new MoaplanCache."""
    cache = MoaplanCache(applied_plan(model), 1, ids.shape[1] + steps)
    kwargs = {cache_keyword(model): cache, "use_cache": True}
    with torch.inference_mode():
        logits = [model(ids, **kwargs).logits[:, -1]]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax(-1, keepdim=True), **kwargs).logits[:, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("compensate", [False, True])
def test_compiled_decode_matches_eager(compensate):
    torch.manual_seed(0)
    model = apply(LlamaForCausalLM(LlamaConfig(**CONFIG)).eval(),
                  mixed_plan(LlamaConfig(**CONFIG), compensate))
    ids = prompt(3, 21)
    eager = _decode_logits(model, ids, 6)
    layers = decoder_layers(model)
    assert len(layers) == CONFIG["num_hidden_layers"]
    # A forward of the instance's own (as accelerate's hooks set) comes back after the block.
    own = functools.partial(type(layers[0]).forward, layers[0])
    layers[0].forward = own
    torch._dynamo.reset()  # compile afresh (the other parameter's run left compiled code)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with compiled_layers(model, backend="aot_eager"):
        compiled = _decode_logits(model, ids, 6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it did compile
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert layers[0].forward is own
    assert all("forward" not in layer.__dict__ for layer in layers[1:])


def test_model_without_named_layers_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError, match="names no decoder layer class"):
        with compiled_layers(model):
            pass


def test_forwards_come_back_when_the_block_fails():
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    with pytest.raises(RuntimeError, match="interrupted"):
        with compiled_layers(model, backend="aot_eager"):
            assert all("forward" in layer.__dict__ for layer in decoder_layers(model))
            raise RuntimeError("interrupted")
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))
