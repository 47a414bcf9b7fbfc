"""Make a Hugging Face model follow a plan: ``apply(model, plan)`` and ``remove(model)``.

How it hooks in, through public ``transformers`` APIs only (no patched classes, no touched
weights): :func:`moaplan.dispatch.switch_attention` switches the model to the plan's attention
function and a matching mask function, and :func:`remove` switches it back.  The attention
function finds its layer's rules through ``module.layer_idx``.

The mask function only marks which slots hold real tokens (not padding, not unwritten
slots of a static cache): the plan's rule positions count *real* tokens, so with left
padding the sinks are the first real tokens, not the first slots.

Length convention: the span of a rule is taken at ``N`` = the sequence's current key length
in real tokens (prompt plus tokens generated so far).  A prefill of ``N`` tokens uses
``span(N)`` for all its queries, and each later query (a decode step, a draft verified by
assisted decoding, a second prompt of a chat) the span at its own length ``N + t``, exactly as
if decoded one token at a time.  So a token generated after a prefill sees exactly what the
last query of a full forward pass over the same tokens would see, while earlier cached states
were computed at the prefill's length; and assisted decoding is lossless against greedy.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moaplan.dispatch import attention_switched, restore_attention, switch_attention
from moaplan.errors import ModelError
from moaplan.kernels.layout import RuleTable
from moaplan.plan import Plan, as_plan, save_plan
from moaplan.runtime.cache import MoaplanCache, cache_keyword
from moaplan.runtime.cached import attend_cached
from moaplan.runtime.layer import NativeAttention, layer_attention

PLAN_FILE = "moaplan_plan.yaml"  # the plan save_pretrained writes beside the weights
# What an attention call may carry that the plan's attention honours (window, soft-capping,
# scaling) or that does not change the result (positions, cache flags).  A model passing
# anything else (attention sinks, ALiBi slopes, ...) is refused up front.
_UNDERSTOOD = frozenset({"sliding_window", "softcap", "scaling", "dropout", "position_ids",
                         "use_cache", "cache_position", "output_attentions", "is_causal"})
_SWITCH = "_moaplan_switch"  # what apply changed, for remove to undo
_PLAN = "_moaplan_plan"  # the applied plan, read by the generate wrapper
_WINDOWS = "_moaplan_windows"  # the model's own window per layer, which bounds its cache


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
    if kv_offset > 0:
        # A sliding-window layer of transformers' own cache dropped its oldest slots (sinks
        # included), so real-token positions can no longer be recovered from slot indices.
        raise ModelError("the model's own cache dropped tokens past its sliding window; decode "
                         "with a MoaplanCache (model.generate under a plan uses one)")
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


def _is_real_token_mask(mask: torch.Tensor) -> bool:
    """Whether a 4D bool mask has :func:`real_token_mask`'s structure: every real query sees
    every real key up to its own slot.  A custom mask (packed documents, prefix-LM, ...) that
    transformers passes through untouched does not, and would be misread."""
    rows = mask[:, 0]
    n_keys = rows.shape[-1]
    key_real, q_real = rows.any(1), rows.any(2)  # [B, Nk], [B, Nq]
    # A real query sees itself: its last visible key is its own slot.
    own = n_keys - 1 - rows.flip(-1).to(torch.int8).argmax(-1)  # [B, Nq]
    upto = torch.arange(n_keys, device=mask.device) <= own[..., None]
    return torch.equal(rows, key_real[:, None, :] & upto & q_real[..., None])


def _check_call(module: torch.nn.Module, n_queries: int, attention_mask: torch.Tensor | None,
                dropout: float, position_ids: torch.Tensor | None) -> None:
    """Refuse what a plan cannot honour, once per forward pass (at the first layer).

    The mask and position checks look at device values (a sync), so they run on chunks of
    several queries only: one decoding query cannot pack documents, and a decode step must
    not sync, since it may be recorded into a CUDA graph (``greedy_generate``)."""
    if dropout:
        raise ModelError("moaplan attention has no dropout; call model.eval() before "
                         "running a model with a plan")
    if module.layer_idx != 0 or n_queries == 1:
        return
    if attention_mask is not None and (attention_mask.dtype != torch.bool
                                       or attention_mask.shape[1] != 1
                                       or not _is_real_token_mask(attention_mask)):
        raise ModelError("a model with a moaplan plan takes a 2D padding attention_mask; a "
                         "custom 4D mask (packed documents, ...) is not supported: run each "
                         "document as its own (padded) sequence")
    if attention_mask is None and position_ids is not None and (
            position_ids.diff(dim=-1) != 1).any():
        raise ModelError("position_ids that restart (packed documents) are not supported with "
                         "a moaplan plan: run each document as its own (padded) sequence")


def _attention_function(tables: tuple[RuleTable, ...]):
    """The attention function of one plan (its rules, one table per layer)."""

    def moaplan_attention(
        module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        attention_mask: torch.Tensor | None, scaling: float | None = None,
        dropout: float = 0.0, sliding_window: int | None = None, softcap: float | None = None,
        position_ids: torch.Tensor | None = None, **_: Any,
    ) -> tuple[torch.Tensor, None]:
        _check_call(module, query.shape[2], attention_mask, dropout, position_ids)
        table = tables[module.layer_idx]
        if sliding_window is not None and any(rule.compensate for rule in table.rules):
            raise ModelError("compensation tokens are not supported on a layer with its own "
                             "sliding window; make the plan without --compensate")
        native = NativeAttention(sliding_window, softcap)
        # A MoaplanCache hands over its compressed per-head view; a dense cache the full keys.
        out = attend_cached(query, key, attention_mask, scaling, native)
        if out is None:
            out = layer_attention(table, query, key, value, attention_mask, scale=scaling,
                                  native=native)
        return out.transpose(1, 2).contiguous(), None

    return moaplan_attention


@dataclass(frozen=True)
class ModelAttention:
    """What :func:`check_attention_routing` found a model's attention calls carry: the
    model's class ``name``, its logit ``softcap``, and each layer's own sliding window
    (None: full attention)."""

    name: str
    softcap: float | None
    windows: tuple[int | None, ...]

    @property
    def window(self) -> int | None:
        """The shortest local window (None: no layer has one)."""
        return min((w for w in self.windows if w is not None), default=None)

    def check_profiling(self, lengths: list[int]) -> None:
        """Refuse (one line, before any work) to profile at ``lengths`` what the profiler
        cannot: soft-capped logits or a local window shorter than the input."""
        if self.softcap is not None:
            raise ModelError(f"{self.name} soft-caps its attention logits, which moaplan's "
                             "profiler does not model; convert or write a plan instead")
        if self.window is not None and self.window < max(lengths):
            raise ModelError(f"{self.name} has layers with a sliding window of {self.window} "
                             f"tokens; profile at lengths up to {self.window}")


def check_attention_routing(config: Any, model_class: type | None = None, *,
                            trust_remote_code: bool = False) -> ModelAttention:
    """Refuse, with a one-line :class:`ModelError`, a model a plan cannot drive: one whose
    attention does not go through ``AttentionInterface`` on every layer, or passes it
    something a plan cannot honour, or whose keys do not have the KV heads and head_dim its
    config declares.  Found by capability, not by name: a copy of the model is built on the
    ``meta`` device (no memory, no weights) and run on 3 tokens with a recording attention.
    ``model_class`` defaults to ``AutoModelForCausalLM``'s choice for ``config``.  Returns
    what the calls carry beyond the plan (:class:`ModelAttention`)."""
    from transformers import AutoModelForCausalLM

    from moaplan.shape import ModelShape

    calls: dict[int | None, tuple[tuple[int, ...], dict[str, Any]]] = {}

    def recording(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> tuple[Any, None]:
        given = {k: v for k, v in kwargs.items() if v is not None}
        calls[getattr(module, "layer_idx", None)] = (tuple(key.shape), given)
        return query.transpose(1, 2), None

    config = copy.deepcopy(config)
    name = model_class.__name__ if model_class else type(config).__name__
    try:
        with torch.device("meta"):
            probe = (model_class(config) if model_class is not None
                     else AutoModelForCausalLM.from_config(
                         config, trust_remote_code=trust_remote_code))
        name = type(probe).__name__
        with attention_switched(probe, recording, mask=real_token_mask), torch.no_grad():
            probe(input_ids=torch.zeros(1, 3, dtype=torch.long, device="meta"))
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        raise ModelError(f"cannot check how {name} computes attention (a forward pass on the "
                         f"meta device failed: {str(err).strip().splitlines()[0]})") from None
    shape = ModelShape.from_config(config)
    missing = sorted(set(range(shape.num_layers)) - set(calls))
    if missing:
        raise ModelError(f"{name} does not compute attention through transformers' "
                         f"AttentionInterface (layers {missing[0]}..{missing[-1]} never call "
                         "it), so a plan cannot change it")
    for layer, (key_shape, given) in sorted(calls.items(), key=lambda kv: str(kv[0])):
        odd = sorted(set(given) - _UNDERSTOOD)
        if odd:
            raise ModelError(f"{name} passes {', '.join(odd)} to its attention (layer "
                             f"{layer}), which a moaplan plan cannot honour")
        if key_shape[1] != shape.num_key_value_heads or key_shape[3] != shape.head_dim:
            raise ModelError(f"{name}'s attention gets {key_shape[1]} KV heads of head_dim "
                             f"{key_shape[3]}, its config declares {shape.num_key_value_heads}"
                             f" of {shape.head_dim}: moaplan cannot plan for it")
    softcaps = [given["softcap"] for _, given in calls.values() if "softcap" in given]
    return ModelAttention(name, softcaps[0] if softcaps else None,
                          tuple(calls[layer][1].get("sliding_window")
                                for layer in range(shape.num_layers)))


def apply(model: Any, plan: Plan | str | Path | None = None, *, strict: bool = True) -> Any:
    """Make ``model`` attend by ``plan``: any causal LM whose attention goes through
    ``transformers``' ``AttentionInterface`` (see :func:`check_attention_routing`), honouring
    the scaling, logit soft-capping and local sliding windows the model passes it.

    ``plan`` is a :class:`~moaplan.plan.Plan` or the path of a plan YAML; None: the plan
    saved beside the model's weights (``PLAN_FILE`` in the directory it was loaded from,
    which ``model.save_pretrained`` writes once a plan is applied).  With ``strict``, the
    plan's config fingerprint must match the model's (see ``Plan.check_model``).  From then
    on ``model.generate`` keeps its KV cache in a :class:`MoaplanCache` of the plan (unless
    given a cache).  Returns the same model object; :func:`remove` switches it back.
    """
    config = model.config
    attention = check_attention_routing(config, type(model))
    if plan is None:
        where = model.name_or_path  # the directory from_pretrained read ("" if none)
        plan = Path(where) / PLAN_FILE
        if not where or not plan.is_file():
            raise ModelError(f"no plan given and none saved beside the model "
                             f"({plan if where else 'it was not loaded from a directory'}); "
                             "call moaplan.apply(model, plan)")
    plan = as_plan(plan)
    plan.check_model(config, strict=strict)
    # Snapshot the rules: a Plan is mutable, but the attention function runs these rules.
    tables = tuple(RuleTable.of(layer) for layer in plan.rules)
    if hasattr(model, _SWITCH):  # a plan applied before: this one replaces it
        restore_attention(getattr(model, _SWITCH))
    setattr(model, _SWITCH, switch_attention(model, _attention_function(tables),
                                             mask=real_token_mask))
    setattr(model, _PLAN, plan)
    setattr(model, _WINDOWS, attention.windows)
    if "generate" not in vars(model):
        model.generate = _generate_with_compressed_cache(model)
        model.save_pretrained = _save_with_plan(model)
    return model


def _save_with_plan(model: Any) -> Any:
    """``model.save_pretrained`` that also writes the applied plan beside the weights, where
    ``apply(model)`` looks after ``from_pretrained`` (the config does not carry the plan:
    a fresh process has no attention function registered under its name)."""
    plain = model.save_pretrained

    @functools.wraps(plain)
    def save_pretrained(save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        out = plain(save_directory, *args, **kwargs)
        save_plan(applied_plan(model), Path(save_directory) / PLAN_FILE)
        return out

    return save_pretrained


def applied_plan(model: Any) -> Plan:
    """The plan :func:`apply` switched ``model`` to."""
    plan = getattr(model, _PLAN, None)
    if plan is None:
        raise ModelError("this model has no moaplan plan applied; call "
                         "moaplan.apply(model, plan) first")
    return plan


@dataclass(frozen=True)
class GenerationRequest:
    """What one ``generate`` call needs of a KV cache, from the generation config actually
    used: ``batch`` sequences after beam / return-sequence expansion, ``length`` slots per
    sequence (prompt, padding included, plus the most tokens it may generate), ``headroom``
    (the longest draft assisted or prompt-lookup decoding may have to drop), and the cache
    implementation the config asks for (None: the default, a MoaplanCache)."""

    batch: int
    length: int
    headroom: int
    device: torch.device
    cache_implementation: str | None

    @classmethod
    def of(cls, model: Any, args: tuple, kwargs: dict[str, Any]) -> GenerationRequest | None:
        """None when the call brings no prompt tensor moaplan can size a cache from, or asks
        for no cache."""
        prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None:
            prompt = embeds  # the embeddings are the prompt; input_ids only prefix the output
        if not isinstance(prompt, torch.Tensor) or prompt.dim() < 2:
            return None
        config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
        config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
        if config.use_cache is False:  # None: the model's default, a cache
            return None
        n_prompt = prompt.shape[1]
        if config.max_new_tokens is not None:
            new = config.max_new_tokens
        elif embeds is not None and kwargs.get("input_ids") is None:
            new = config.max_length  # then max_length counts the generated tokens only
        else:
            new = max(config.max_length - n_prompt, 0)
        drafts = (kwargs.get("assistant_model") is not None
                  or config.prompt_lookup_num_tokens is not None)
        expand = max(config.num_beams or 1, config.num_return_sequences or 1)
        return cls(batch=prompt.shape[0] * expand, length=n_prompt + new,
                   headroom=new if drafts else 0, device=prompt.device,
                   cache_implementation=config.cache_implementation)


def _generate_with_compressed_cache(model: Any) -> Any:
    """``model.generate`` that keeps its KV cache in a :class:`MoaplanCache` of the applied
    plan, sized by :class:`GenerationRequest` from the generation config actually used, for
    every call that brings no cache of its own (``cache_implementation="moaplan"`` asks for
    it by name: transformers has no registry of cache implementations to add it to).  A
    MoaplanCache a call brings (a chat's next turn) grows when the call needs more room."""
    plain = model.generate

    @functools.wraps(plain)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cache_implementation") == "moaplan":
            del kwargs["cache_implementation"]
        request = GenerationRequest.of(model, args, kwargs)
        key = cache_keyword(model)
        given = kwargs.get(key, kwargs.get("past_key_values"))
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        # The token ids this call continues from, when the prompt is token ids (not embeddings).
        context = ids if (isinstance(ids, torch.Tensor) and not ids.is_floating_point()
                          and kwargs.get("inputs_embeds") is None) else None
        if isinstance(given, MoaplanCache):
            _check_cache(model, given, context)
            if request is not None:
                given.grow(request.length)
        elif given is None and request is not None and request.cache_implementation is None:
            kwargs[key] = MoaplanCache(applied_plan(model), request.batch, request.length,
                                       dtype=model.dtype, device=request.device,
                                       headroom=request.headroom,
                                       windows=getattr(model, _WINDOWS))
        out = plain(*args, **kwargs)
        if isinstance(given, MoaplanCache) and context is not None:
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
    if not hasattr(model, _SWITCH):
        raise ModelError("this model has no moaplan plan applied")
    restore_attention(getattr(model, _SWITCH))
    delattr(model, _SWITCH)
    delattr(model, _PLAN)
    delattr(model, _WINDOWS)
    del model.generate, model.save_pretrained  # the class's methods again
    return model
