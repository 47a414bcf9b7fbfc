"""Make a Hugging Face model follow a plan: ``apply(model, plan)`` and ``remove(model)``.

How it hooks in, through public ``transformers`` APIs only (no patched classes, no touched
weights): the plan's attention function and a matching mask function are registered in
``AttentionInterface`` and ``AttentionMaskInterface`` under a name derived from the plan's
rules, and the model is switched to that name with ``model.set_attn_implementation``.  The
attention function finds its layer's rules through ``module.layer_idx``.

The mask function only marks which slots hold real tokens (not padding, not unwritten
slots of a static cache): the plan's rule positions count *real* tokens, so with left
padding the sinks are the first real tokens, not the first slots.

Length convention: the span of a rule is taken at ``N`` = the sequence's current key length
in real tokens (prompt plus tokens generated so far).  A prefill of ``N`` tokens uses
``span(N)`` for all its queries, and each decode step uses ``span(N + t)``.  So a token
generated after a prefill sees exactly what the last query of a full forward pass over the
same tokens would see, while earlier cached states were computed at the prefill's length.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from moaplan.errors import ModelError
from moaplan.plan import Plan, as_plan
from moaplan.rules import Rule
from moaplan.runtime.cache import MoaplanCache, attend_cached, cache_keyword
from moaplan.runtime.layer import layer_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_PREFIX = "moaplan_"
_PREVIOUS = "_moaplan_previous_attn_implementation"
_PLAN = "_moaplan_plan"  # the applied plan, read by the generate wrapper


def real_token_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    config: Any = None,
    device: torch.device | str = "cpu",
    **_: Any,
) -> torch.Tensor | None:
    """The mask function registered in ``AttentionMaskInterface`` (called like
    ``transformers.masking_utils.sdpa_mask``).

    Returns a bool ``[B, 1, Nq, Nk]``: True where query slot ``t`` holds a real token and key
    slot ``j`` is a real token at or before it; rows of padding queries are all False.  None
    when there is no padding and the queries are the last ``Nq`` slots.  The causal / sliding
    ``mask_function`` transformers passes is ignored on purpose: the plan's rules decide what
    is seen, from real-token positions that only the attention function knows.
    """
    q_offset = int(q_offset)
    written = q_offset + q_length  # slots written so far, padding included
    window = getattr(config, "sliding_window", None)
    if window is not None and written > window:
        # Past its native window the model's cache crops old slots (sinks included), so
        # real-token positions could no longer be recovered from slot indices.
        raise ModelError(f"inputs longer than the model's native sliding window ({window}) "
                         "are not supported with a plan; set config.sliding_window = None "
                         "for full attention")
    if (attention_mask is None or bool(attention_mask.all())) and written == kv_offset + kv_length:
        return None
    q_slot = torch.arange(q_offset, written, device=device)
    k_slot = torch.arange(kv_offset, kv_offset + kv_length, device=device)
    total = max(written, kv_offset + kv_length)
    if attention_mask is None:
        real = torch.ones(batch_size, total, dtype=torch.bool, device=device)
    else:  # like transformers: slots past the end of the 2D mask are padding
        real = attention_mask[:, :total].to(device=device, dtype=torch.bool)
        real = torch.nn.functional.pad(real, (0, total - real.shape[1]))
    causal = k_slot[None, :] <= q_slot[:, None]
    return (causal & real[:, None, k_slot] & real[:, q_slot, None])[:, None]


def _attention_function(rules: tuple[tuple[Rule, ...], ...]):
    """The function registered in ``AttentionInterface`` for one plan."""

    def moaplan_attention(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None = None,
        dropout: float = 0.0, **_: Any,
    ) -> tuple[torch.Tensor, None]:
        if dropout:
            raise ModelError("moaplan attention has no dropout; call model.eval() before "
                             "running a model with a plan")
        if attention_mask is not None and (attention_mask.dtype != torch.bool
                                           or attention_mask.shape[1] != 1):
            raise ModelError("a model with a moaplan plan takes a 2D padding attention_mask, "
                             "not a custom 4D mask")
        # A MoaplanCache hands over its compressed per-head view; a dense cache the full keys.
        out = attend_cached(query, key, attention_mask, scaling)
        if out is None:
            out = layer_attention(rules[module.layer_idx], query, key, value, attention_mask,
                                  scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return moaplan_attention


def implementation_name(plan: Plan) -> str:
    """The registry name of a plan: a hash of its rules, so that equal plans share it."""
    digest = hashlib.sha256(repr(plan.rules).encode()).hexdigest()[:16]
    return _PREFIX + digest


def apply(model: Any, plan: Plan | str | Path, *, strict: bool = True) -> Any:
    """Make ``model`` (Llama, Mistral or Qwen2, GQA included) attend by ``plan``.

    ``plan`` is a :class:`~moaplan.plan.Plan` or the path of a plan YAML.  With ``strict``,
    the plan's config fingerprint must match the model's (see ``Plan.check_model``).
    From then on ``model.generate`` keeps its KV cache in a :class:`MoaplanCache` of the plan
    (unless given a cache).  Returns the same model object; :func:`remove` switches it back.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"moaplan cannot apply a plan to a {model_type!r} model; supported "
                         f"architectures: {', '.join(SUPPORTED_MODEL_TYPES)}")
    plan = as_plan(plan)
    plan.check_model(config, strict=strict)
    name = implementation_name(plan)
    # Snapshot the rules: a Plan is mutable, but the registered name describes these rules.
    rules = tuple(tuple(layer) for layer in plan.rules)
    AttentionInterface.register(name, _attention_function(rules))
    AttentionMaskInterface.register(name, real_token_mask)
    current = config._attn_implementation
    if current and not current.startswith(_PREFIX):
        setattr(model, _PREVIOUS, current)
    model.set_attn_implementation(name)
    setattr(model, _PLAN, plan)
    if "generate" not in vars(model):
        model.generate = _generate_with_compressed_cache(model)
    return model


def applied_plan(model: Any) -> Plan:
    """The plan :func:`apply` switched ``model`` to."""
    plan = getattr(model, _PLAN, None)
    if plan is None:
        raise ModelError("this model has no moaplan plan applied; call "
                         "moaplan.apply(model, plan) first")
    return plan


def _generate_with_compressed_cache(model: Any) -> Any:
    """``model.generate`` that hands a :class:`MoaplanCache` of the applied plan to every call
    that brings no cache (nor a ``cache_implementation``) of its own, sized for the prompt plus
    the tokens asked for.  Beam search and several returned sequences grow the batch inside
    ``generate``; they keep transformers' own cache (the plan still applies, masked)."""
    plain = model.generate

    @functools.wraps(plain)
    def generate(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        config = model.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        single = (kwargs.get("num_beams", config.num_beams) or 1) == 1 and (
            kwargs.get("num_return_sequences", config.num_return_sequences) or 1) == 1
        own_cache = (kwargs.get("past_key_values") is not None
                     or kwargs.get("cache") is not None or not kwargs.get("use_cache", True)
                     or kwargs.get("cache_implementation", config.cache_implementation))
        given = kwargs.get("past_key_values", kwargs.get("cache"))
        if isinstance(given, MoaplanCache):
            _check_cache(model, given, ids)
        if not own_cache and single and isinstance(ids, torch.Tensor) and ids.dim() == 2 and new:
            kwargs[cache_keyword(model)] = MoaplanCache(
                applied_plan(model), ids.shape[0], ids.shape[1] + new, dtype=model.dtype,
                device=ids.device)
        out = plain(*args, **kwargs)
        if isinstance(given, MoaplanCache):
            given.remember(out if isinstance(out, torch.Tensor) else out.sequences)
        return out

    return generate


def _check_cache(model: Any, cache: MoaplanCache, ids: Any) -> None:
    """Refuse a user's cache that was made for another plan, or that still holds another
    request's context."""
    if cache.plan.rules != applied_plan(model).rules:
        raise ModelError("this MoaplanCache was made for another plan than the one applied to "
                         "the model; make it from moaplan.applied_plan(model)")
    if isinstance(ids, torch.Tensor):
        cache.check_continues(ids)


def remove(model: Any) -> Any:
    """Switch a model that :func:`apply` changed back to its previous attention."""
    previous = getattr(model, _PREVIOUS, None)
    if previous is None:
        raise ModelError("this model has no moaplan plan applied")
    model.set_attn_implementation(previous)
    delattr(model, _PREVIOUS)
    delattr(model, _PLAN)
    del model.generate  # the class's generate again
    return model
