"""The one-launch writes of :mod:`moaplan.kernels.append` against their torch versions: the
decode write step after step through ring wrap-around, with padding rows and compensating
heads, and a chunk's write into runs of slots.

The Triton kernel runs on the CPU in a worker whose Triton was imported with
``TRITON_INTERPRET=1`` (see ``interpreter.py``); everything it writes must equal what the torch
path writes, bit for bit: both only copy values, and add the same fp32 values to the sums.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import interpreter_pool
from transformers import LlamaConfig

from moaplan.kernels.append import append_token, write_slots
from moaplan.plan import ModelShape, Plan
from moaplan.rules import Rule
from moaplan.runtime.cache import MoaplanCache

HKV, DIM = 3, 32
RULES = [Rule(sink=3, alpha=4.0, beta=0.25, compensate=True),  # elastic, compensating
         Rule.window(5),  # fixed window, no sinks
         Rule.full_attention()]


def _interpreted(args: tuple) -> tuple[torch.Tensor, ...]:
    """Runs in the worker: the kernel writes into its copies of the buffers, returned."""
    if len(args) == 8:  # a chunk's write
        key, value, keys, values = args[:4]
        write_slots(*args, backend="triton")
        return keys, values
    key, value, keys, values, key_sum, value_sum, layout, n_after, real, table = args
    spans = append_token(key, value, keys, values, key_sum, value_sum, layout, n_after, real,
                         table, backend="triton")
    return spans, keys, values, key_sum, value_sum


@pytest.fixture(scope="module")
def interp():
    with interpreter_pool() as pool:
        yield lambda *args: pool.submit(_interpreted, args).result()


def _layer(dtype: torch.dtype, batch: int, max_length: int, device: str = "cpu"):
    config = LlamaConfig(hidden_size=HKV * DIM * 2, num_attention_heads=HKV * 2,
                         num_key_value_heads=HKV, num_hidden_layers=1, vocab_size=11)
    plan = Plan(ModelShape.from_config(config), [RULES])
    return MoaplanCache(plan, batch, max_length, dtype=dtype, device=device).layers[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_matches_the_torch_path(interp, dtype):
    gen = torch.Generator().manual_seed(0)
    batch, prefix, steps = 3, 6, 14
    layer = _layer(dtype, batch, prefix + steps)
    # A prefix with left padding, so the sequences start at different real lengths.
    real = torch.ones(batch, prefix, dtype=torch.bool)
    real[1, :2] = real[2, :5] = False
    k = torch.randn(batch, HKV, prefix, DIM, generator=gen).to(dtype)
    layer.append(k, torch.randn_like(k, dtype=torch.float32).to(dtype), chunk_real=real)
    for step in range(steps):
        # Strided new tokens (a slice of a wider tensor), as RoPE'd keys arrive.
        wide = torch.randn(batch, HKV, 1, 2 * DIM, generator=gen).to(dtype)
        key, value = wide[..., :DIM], wide[..., DIM:]
        real = None if step % 3 else torch.tensor([True, step % 2 == 0, True])
        n_after = layer.n_real + (1 if real is None else real)
        state = tuple(x.clone() for x in (layer.keys, layer.values, layer.key_sum,
                                          layer.value_sum))
        got = interp(key, value, *state, layer.layout, n_after, real, layer.rules)
        want_spans = append_token(key, value, layer.keys, layer.values, layer.key_sum,
                                  layer.value_sum, layer.layout, n_after, real, layer.rules,
                                  backend="torch")
        assert torch.equal(got[0], want_spans.to(torch.int32)), f"spans, step {step}"
        for name, out, ref in zip(("keys", "values", "key_sum", "value_sum"), got[1:],
                                  (layer.keys, layer.values, layer.key_sum, layer.value_sum)):
            assert torch.equal(out, ref), f"{name}, step {step}"
        layer.n_real = n_after
    assert int(layer.key_sum.abs().sum()) > 0  # the compensating head's ring did overwrite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunk_write_matches_the_torch_path(interp, dtype):
    # 150 slots from slot 7 of a 200-slot buffer (more than one program's 64), keys strided
    # as RoPE'd keys arrive, some slots keeping their content (rank < 0).
    gen = torch.Generator().manual_seed(1)
    batch, n_slots, first, chunk = 2, 150, 7, 40
    wide = torch.randn(batch, HKV, chunk, 2 * DIM, generator=gen).to(dtype)
    key, value = wide[..., :DIM], wide[..., DIM:]
    keys, values = (torch.randn(batch, 200, DIM, generator=gen).to(dtype) for _ in range(2))
    head = torch.randint(0, HKV, (n_slots,), generator=gen)
    rank = torch.randint(-3, 5, (batch, n_slots), generator=gen)
    index = torch.randint(0, chunk, (batch, n_slots), generator=gen)
    args = (key, value, keys.clone(), values.clone(), first, head, rank, index)
    got_keys, got_values = interp(*args)
    write_slots(key, value, keys, values, first, head, rank, index, backend="torch")
    assert torch.equal(got_keys, keys) and torch.equal(got_values, values)
    # Slots outside the run and those of rank < 0 kept their content; the others were written.
    assert torch.equal(keys[:, :first], args[2][:, :first])
    assert torch.equal(keys[:, first + n_slots:], args[2][:, first + n_slots:])
    run, before = keys[:, first:first + n_slots], args[2][:, first:first + n_slots]
    kept = rank < 0
    assert torch.equal(run[kept], before[kept])
    assert torch.equal(run[~kept], key[torch.arange(batch)[:, None], head, index][~kept])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunk_writes_on_gpu_in_bf16_match_the_cpu():
    # A left-padded prefix, then a padded chunk that wraps the rings, into a bf16 cache: the
    # CUDA kernel writes the same slots as the torch path on the CPU.
    gen = torch.Generator().manual_seed(4)
    batch = 3
    layers = {device: _layer(torch.bfloat16, batch, 30, device) for device in ("cpu", "cuda")}
    for length, padding in ((6, (0, 2, 5)), (11, (0, 3, 0))):
        k, v = (torch.randn(batch, HKV, length, 2 * DIM, generator=gen)[..., ::2]
                .to(torch.bfloat16) for _ in range(2))  # strided, as RoPE'd keys arrive
        real = torch.ones(batch, length, dtype=torch.bool)
        for b, pad in enumerate(padding):
            real[b, :pad] = False
        for device, layer in layers.items():
            layer.append(k.to(device), v.to(device), chunk_real=real.to(device))
    cpu, gpu = layers["cpu"], layers["cuda"]
    assert torch.equal(gpu.keys.cpu(), cpu.keys) and torch.equal(gpu.values.cpu(), cpu.values)
    assert torch.equal(gpu.n_real.cpu(), cpu.n_real)
    torch.testing.assert_close(gpu.key_sum.cpu(), cpu.key_sum)
