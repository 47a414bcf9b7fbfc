"""Profiling a model whose layers are placed over several devices (accelerate's dispatch): the
device map, the same profile as one device (on the CPU through the same hooks; on two GPUs
when there are), combined with data parallelism, the LM head in chunks, and the memory
estimate that chooses the layout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_profile import BLOCK, SPACE, Sample, _model, _samples
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from moaplan.errors import ModelError
from moaplan.model import byte_tokenizer, load_model
from moaplan.model.placement import layer_device_map, meta_model, place_layers
from moaplan.profile import load_profile, profile_model, save_profile
from moaplan.profile.layout import (
    GIB,
    MemoryEstimate,
    choose_layout,
    estimate_memory,
    fewest_gpus,
    weight_bytes,
)

TWO_GPUS = [torch.device("cuda", 0), torch.device("cuda", 1)]


def _same(a, b, rtol=1e-6):
    for n in a.lengths:
        assert a.finished[n] == b.finished[n]
        np.testing.assert_allclose(b.far_sum[n], a.far_sum[n], rtol=rtol, atol=1e-12)
        np.testing.assert_allclose(b.sink_sum[n], a.sink_sum[n], rtol=rtol, atol=1e-12)


def test_layer_device_map_splits_the_layers_evenly_in_running_order():
    model = _model(num_hidden_layers=4)
    assert layer_device_map(model, TWO_GPUS) == {
        "model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0,
        "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 0,
        "lm_head": 1}
    # tied embeddings stay together; GPT-2 keeps its layers in `transformer.h`
    gpt2 = meta_model(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=50))
    placed = layer_device_map(gpt2, [*TWO_GPUS, torch.device("cuda", 2)])
    assert [placed[f"transformer.h.{i}"] for i in range(3)] == [0, 1, 2]
    assert placed["transformer.wte"] == placed["lm_head"] == 0 and placed["transformer.ln_f"] == 2


def test_layers_placed_through_accelerate_hooks_give_the_same_profile():
    model = _model(num_hidden_layers=4)
    samples = _samples(lengths=(40, 70), per_length=2)
    plain = profile_model(model, samples, block=BLOCK, rule_space=SPACE)
    placed = place_layers(copy.deepcopy(model), layer_device_map(model, ["cpu", "cpu"]))
    assert all(hasattr(layer, "_hf_hook") for layer in placed.model.layers)
    _same(plain, profile_model(placed, samples, block=BLOCK, rule_space=SPACE))
    _same(plain, profile_model(placed, samples, block=BLOCK, rule_space=SPACE,
                               gradient_checkpointing=True), rtol=1e-5)


def test_from_pretrained_loads_by_the_layer_map(tmp_path):
    model = _model(num_hidden_layers=3)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)  # load_model reads a tokenizer too
    device_map = layer_device_map(meta_model(model.config), ["cpu", "cpu"])
    loaded, _ = load_model(tmp_path, device_map=device_map)
    # the map places every weight (on one device transformers attaches no hooks to check it)
    assert all(any(name.startswith(key + ".") for key in device_map)
               for name in loaded.state_dict())
    samples = _samples(lengths=(40,), per_length=1)
    _same(profile_model(model, samples, block=BLOCK, rule_space=SPACE),
          profile_model(loaded, samples, block=BLOCK, rule_space=SPACE))


def test_the_lm_head_in_chunks_gives_the_same_profile(monkeypatch):
    import moaplan.profile.profiler as profiler

    model = _model()
    samples = _samples(lengths=(70,), per_length=2)  # 47 response tokens each
    whole = profile_model(model, samples, block=BLOCK, rule_space=SPACE)
    monkeypatch.setattr(profiler, "_HEAD_ELEMENTS", 10 * model.config.vocab_size)
    assert profiler.head_rows(model.config.vocab_size) == 10
    _same(whole, profile_model(model, samples, block=BLOCK, rule_space=SPACE), rtol=1e-5)
    for objective in ("cross_entropy", "log_odds"):
        with torch.no_grad():
            chunked, _ = profiler.response_loss(model, samples[70][0], objective)
        monkeypatch.setattr(profiler, "_HEAD_ELEMENTS", 1 << 27)
        with torch.no_grad():
            one, _ = profiler.response_loss(model, samples[70][0], objective)
        assert float(chunked) == pytest.approx(float(one), rel=1e-6)
        monkeypatch.setattr(profiler, "_HEAD_ELEMENTS", 10 * model.config.vocab_size)


def _placed_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = _model(num_hidden_layers=4)
    place_layers(model, layer_device_map(model, ["cpu", "cpu"]))
    profile = profile_model(model, _samples(lengths=(40,), per_length=3), block=BLOCK,
                            rule_space=SPACE, gradient_checkpointing=True)
    if rank == 0:
        save_profile(profile, out)
    dist.destroy_process_group()


def test_placed_layers_combine_with_data_parallel_ranks(tmp_path):
    out = tmp_path / "dist.safetensors"
    torch.multiprocessing.spawn(_placed_worker,
                                args=(2, f"file://{tmp_path}/rendezvous", str(out)),
                                nprocs=2, join=True)
    single = profile_model(_model(num_hidden_layers=4), _samples(lengths=(40,), per_length=3),
                           block=BLOCK, rule_space=SPACE)
    _same(single, load_profile(out), rtol=1e-5)


def _llama(**fields) -> LlamaConfig:
    return LlamaConfig(**{**dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=32768), **fields})


def test_the_estimate_meets_the_measured_anchor_and_places_a_70b_shape_on_two_h200s():
    # Llama-3-8B shape, vocab 32000, bf16, 32K, checkpointing: 29.9 GiB measured on an H100
    config = _llama()
    weights = weight_bytes(meta_model(config), torch.bfloat16)
    anchor = estimate_memory(config, weights, 32768, torch.bfloat16, True).per_gpu(1) / GIB
    assert anchor == pytest.approx(29.9, rel=0.1)
    big = _llama(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64)
    weights = weight_bytes(meta_model(big), torch.bfloat16)
    assert weights / 1e9 == pytest.approx(141, rel=0.01)
    h200 = [139 * GIB] * 2
    estimates = {ckpt: estimate_memory(big, weights, 32768, torch.bfloat16, ckpt)
                 for ckpt in (False, True)}
    assert fewest_gpus(estimates, h200) == (2, True)
    assert fewest_gpus(estimates, h200[:1]) is None


def test_fewest_gpus_prefers_one_gpu_then_checkpointing_then_more_gpus():
    plain, ckpt = MemoryEstimate(60, 40, 10), MemoryEstimate(60, 10, 15)
    assert fewest_gpus({False: plain, True: ckpt}, [200, 200]) == (1, False)
    assert fewest_gpus({False: plain, True: ckpt}, [100, 100]) == (1, True)
    assert fewest_gpus({False: plain, True: ckpt}, [70, 70]) == (2, False)
    assert fewest_gpus({True: ckpt}, [60, 60]) == (2, True)
    assert fewest_gpus({True: ckpt}, [20, 20]) is None


def test_auto_layout_takes_the_fewest_gpus_of_each_rank(monkeypatch):
    """On a pretend host of four 139 GiB GPUs: a 70B shape at 32K takes two GPUs (its rank's
    first two) with checkpointing, an 8B one at 4K one GPU, asked only once for its memory."""
    asked = []

    def free_memory(device):
        asked.append(device.index)
        return 139 * GIB, 141 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    big = _llama(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                 num_hidden_layers=80, num_attention_heads=64)
    layout = choose_layout(big, [16384, 32768], torch.bfloat16)
    assert layout.devices == tuple(TWO_GPUS) and layout.checkpointing and layout.sharded
    assert "layers placed over cuda:0, cuda:1" in layout.describe()
    second = choose_layout(big, [32768], torch.bfloat16, local_rank=1, local_world=2)
    assert second.devices == (torch.device("cuda", 2), torch.device("cuda", 3))
    asked.clear()
    small = choose_layout(_llama(), [4096], torch.bfloat16, local_rank=1, local_world=2)
    assert small.devices == (torch.device("cuda", 2),) and not small.checkpointing
    assert asked == [2]
    with pytest.raises(ModelError, match="even with its layers over the 2 GPU"):
        choose_layout(big, [131072], torch.bfloat16, local_rank=0, local_world=2)


def test_a_gpu_count_this_machine_lacks_is_refused_before_loading():
    if torch.cuda.device_count() >= 64:
        pytest.skip("a machine with 64 GPUs")
    with pytest.raises(ModelError, match="GPU"):
        choose_layout(_llama(num_hidden_layers=2), [1024], torch.bfloat16, gpus_per_model=64)


def test_profile_command_refuses_gpus_per_model_without_gpus(tmp_path, capsys):
    from moaplan.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    assert main(["profile", "--gpus-per-model", "2", "--lengths", "128",
                 "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "this machine has 0" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_give_the_profile_of_one(tmp_path):
    """A bf16 model that fits one GPU: its layers over two GPUs (loaded by from_pretrained
    with the layer map, Triton influence kernel, with and without checkpointing) give the
    single-GPU profile."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=4096)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    one, _ = load_model(tmp_path, torch.bfloat16, "cuda:0")
    two, _ = load_model(tmp_path, torch.bfloat16,
                        device_map=layer_device_map(meta_model(config), TWO_GPUS))
    assert {p.device.index for p in two.parameters()} == {0, 1}
    g = torch.Generator().manual_seed(0)
    samples = {}
    for n in (1024, 2048):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 2:] = True
        samples[n] = [Sample(torch.randint(0, 1000, (n,), generator=g), mask) for _ in range(2)]
    for checkpointing in (False, True):
        ref = profile_model(one, samples, backend="triton",
                            gradient_checkpointing=checkpointing)
        got = profile_model(two, samples, backend="triton",
                            gradient_checkpointing=checkpointing)
        # bf16, and FlashAttention's backward and the influence kernel add in fp32 atomics in
        # no fixed order: two runs on one GPU differ this much too
        for n in samples:
            assert got.finished[n] == ref.finished[n] == 2
            for a, b in ((ref.far_sum[n], got.far_sum[n]), (ref.sink_sum[n], got.sink_sum[n])):
                assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max()
