"""``generate`` under a plan as transformers users call it: the cache is a MoaplanCache sized
from the generation config actually used (``generation_config=``, ``max_length=``,
``inputs=``, ``inputs_embeds=``, beams, several returned sequences, assisted decoding, a
chat's next turn), its memory is really compressed, and the tokens equal the same plan
decoded one token at a time (or, for beam search and sampling, the plan's dense path)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ids_for, make_plan, tiny_model
from transformers import DynamicCache, GenerationConfig

from moaplan.rules import Rule
from moaplan.runtime import MoaplanCache, apply, kv_bytes
from moaplan.runtime.cache import cache_keyword

GREEDY = dict(do_sample=False, pad_token_id=0)
PROMPT = 14


@pytest.fixture(scope="module")
def model_and_plan():
    """A tiny Llama under an elastic plan (windows that grow with the length, sinks, one full
    head), so that the rule length of every query matters."""
    model = tiny_model("llama")
    plan = make_plan(model, [[Rule(sink=2, alpha=3.0, beta=0.25), Rule.window(5, sink=1)],
                             [Rule.full_attention(), Rule(sink=1, alpha=2.0, beta=0.5)]])
    apply(model, plan)
    return model, plan


def stepwise(model, plan, turns: list[torch.Tensor], new: list[int]) -> torch.Tensor:
    """Greedy tokens of a chat under the plan: the first prompt in one forward pass, then
    every token (generated or a later turn's) one forward pass at a time."""
    cache = MoaplanCache(plan, 1, sum(t.shape[1] for t in turns) + sum(new))
    key = cache_keyword(model)
    seq = turns[0]
    with torch.no_grad():
        logits = model(seq, **{key: cache}).logits[:, -1]
        for i, (turn, count) in enumerate(zip(turns, new)):
            for token in turn[0] if i else []:
                logits = model(token.view(1, 1), **{key: cache}).logits[:, -1]
                seq = torch.cat([seq, token.view(1, 1)], 1)
            for _ in range(count):
                token = logits.argmax(-1, keepdim=True)
                seq = torch.cat([seq, token], 1)
                logits = model(token, **{key: cache}).logits[:, -1]
    return seq


def assert_compressed(model, plan, cache, length: int, batch: int = 1) -> None:
    assert isinstance(cache, MoaplanCache) and cache.max_length == length
    assert cache.nbytes() < kv_bytes(plan, model, length, batch, dense=True)


@pytest.mark.parametrize("how", ["generation_config", "max_length", "inputs",
                                 "cache_implementation"])
def test_greedy_generate_sizes_its_cache_from_the_config_used(model_and_plan, how):
    model, plan = model_and_plan
    ids = ids_for(0, 1, PROMPT)
    call = {"generation_config": dict(generation_config=GenerationConfig(max_new_tokens=7,
                                                                         **GREEDY)),
            "max_length": dict(max_length=PROMPT + 7, **GREEDY),
            "inputs": dict(max_new_tokens=7, **GREEDY),
            "cache_implementation": dict(max_new_tokens=7, cache_implementation="moaplan",
                                         **GREEDY)}[how]
    with torch.no_grad():
        if how == "inputs":
            out = model.generate(inputs=ids, return_dict_in_generate=True, **call)
        else:
            out = model.generate(ids, return_dict_in_generate=True, **call)
    assert torch.equal(out.sequences, stepwise(model, plan, [ids], [7]))
    assert_compressed(model, plan, out.past_key_values, PROMPT + 7)


def test_inputs_embeds(model_and_plan):
    model, plan = model_and_plan
    ids = ids_for(1, 1, PROMPT)
    with torch.no_grad():
        out = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=6,
                             return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, stepwise(model, plan, [ids], [6])[:, PROMPT:])
    assert_compressed(model, plan, out.past_key_values, PROMPT + 6)


@pytest.mark.parametrize("search", [dict(num_beams=2, num_return_sequences=2, **GREEDY),
                                    dict(do_sample=True, num_return_sequences=2, top_k=5,
                                         pad_token_id=0)], ids=["beams", "sampled"])
def test_beams_and_returned_sequences_keep_the_compressed_cache(model_and_plan, search):
    # Beam search reorders the cache every step; both grow the batch inside generate.
    model, plan = model_and_plan
    ids = ids_for(2, 1, PROMPT)
    runs = []
    for cache in (None, DynamicCache()):  # the MoaplanCache, then the plan's dense path
        torch.manual_seed(0)
        with torch.no_grad():
            runs.append(model.generate(ids, max_new_tokens=6, return_dict_in_generate=True,
                                       **{cache_keyword(model): cache}, **search))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert runs[0].sequences.shape[0] == 2
    assert_compressed(model, plan, runs[0].past_key_values, PROMPT + 6, batch=2)


def test_assisted_decoding_is_lossless(model_and_plan):
    # A different (unplanned) assistant drafts tokens the planned model partly rejects; the
    # rejected drafts are cropped from the MoaplanCache.
    model, plan = model_and_plan
    assistant = tiny_model("llama", num_hidden_layers=1)
    # Drafts of 5 tokens whatever the assistant's confidence: several tokens dropped at once.
    assistant.generation_config.update(assistant_confidence_threshold=0.0,
                                       num_assistant_tokens=5,
                                       num_assistant_tokens_schedule="constant")
    ids = ids_for(3, 1, PROMPT)
    with torch.no_grad():
        drafted = model.generate(ids, assistant_model=assistant, max_new_tokens=12,
                                 return_dict_in_generate=True, **GREEDY)
        assert not torch.equal(assistant.generate(ids, max_new_tokens=12, **GREEDY),
                               drafted.sequences)
    assert torch.equal(drafted.sequences, stepwise(model, plan, [ids], [12]))
    assert isinstance(drafted.past_key_values, MoaplanCache)


def test_a_chats_next_turn_grows_the_cache(model_and_plan):
    model, plan = model_and_plan
    first, second = ids_for(4, 1, PROMPT), ids_for(5, 1, 9)
    with torch.no_grad():
        turn = model.generate(first, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
        cache = turn.past_key_values
        assert cache.max_length == PROMPT + 5
        chat = torch.cat([turn.sequences, second], 1)
        out = model.generate(chat, max_new_tokens=6, return_dict_in_generate=True,
                             **{cache_keyword(model): cache}, **GREEDY)
    assert out.past_key_values is cache
    assert_compressed(model, plan, cache, chat.shape[1] + 6)
    assert torch.equal(out.sequences, stepwise(model, plan, [first, second], [5, 6]))


def test_a_cache_the_call_asks_for_is_left_alone(model_and_plan):
    model, plan = model_and_plan
    ids = ids_for(6, 1, PROMPT)
    config = GenerationConfig(max_new_tokens=5, cache_implementation="static", **GREEDY)
    with torch.no_grad():
        static = model.generate(ids, generation_config=config, return_dict_in_generate=True)
        uncached = model.generate(ids, max_new_tokens=5, use_cache=False, **GREEDY)
    assert not isinstance(static.past_key_values, MoaplanCache)
    assert torch.equal(static.sequences, stepwise(model, plan, [ids], [5]))
    assert uncached.shape == (1, PROMPT + 5)


def test_a_local_layers_cache_holds_no_more_than_its_window():
    # Gemma 3's layer 0 sees only its last 12 tokens whatever the plan: its rings stop there.
    model = tiny_model("gemma3")
    plan = make_plan(model, [[Rule.full_attention(), Rule(sink=2, alpha=4.0, beta=0.5)]] * 2)
    apply(model, plan)
    ids = ids_for(7, 1, 30)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, stepwise(model, plan, [ids], [8]))
    assert out.past_key_values.nbytes() < MoaplanCache(plan, 1, 38).nbytes()
