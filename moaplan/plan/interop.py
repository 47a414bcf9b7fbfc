"""Import the plans of earlier systems: MoA's plan JSON and DuoAttention's head gates."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np

from moaplan.errors import PlanError
from moaplan.io import read_text
from moaplan.plan.plan import ModelShape, Plan
from moaplan.rules import Rule

# A MoA plan JSON or a DuoAttention gate table of the largest models is a few hundred KiB.
MAX_IMPORT_BYTES = 64 * 2**20

MOA_SINK = 64  # MoA's plans always keep 64 initial tokens


def _read(path: str | os.PathLike) -> str:
    return read_text(path, "file", MAX_IMPORT_BYTES, PlanError)


def moa_rules_from_json(data: dict, group_size: int) -> list[list[Rule]]:
    """Rules per (layer, KV head) from MoA's ``{"alphas": [[...]], "betas": [[...]]}``.

    MoA gives one ``(alpha, beta)`` per *query* head with span ``alpha + beta * N`` and a
    64-token sink; moaplan keeps one rule per KV head so the cache really shrinks, and takes
    the widest rule of each GQA group (the largest span at every length, since spans are
    linear).  A rule with ``beta >= 1`` spans every length and is full.  Where the members of
    a group differ, the rule keeps them as its ``query_windows``: the prefill computes each
    query head's own span, the cache the widest.
    """
    try:
        alphas = np.asarray(data["alphas"], dtype=np.float64)
        betas = np.asarray(data["betas"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"not a MoA plan: expected numeric 'alphas' and 'betas' lists of lists "
                        f"({err})") from None
    if alphas.ndim != 2 or alphas.shape != betas.shape:
        raise PlanError(f"MoA plan 'alphas' {alphas.shape} and 'betas' {betas.shape} must both "
                        "be (layers, heads)")
    if alphas.shape[1] % group_size:
        raise PlanError(f"MoA plan has {alphas.shape[1]} heads per layer, not a multiple of the "
                        f"GQA group size {group_size}")
    if (alphas < 0).any() or (betas < 0).any():
        raise PlanError("MoA plan has negative alphas or betas")
    layers, heads = alphas.shape
    kv = heads // group_size
    # Spans are linear in N, so the largest alpha and the largest beta of a group give a rule
    # at least as wide as every member at every length (exactly the widest member when one
    # member dominates, as is usual).
    alpha = alphas.reshape(layers, kv, group_size).max(-1)
    beta = betas.reshape(layers, kv, group_size).max(-1)
    members = np.stack([alphas, betas], -1).reshape(layers, kv, group_size, 2)
    rules = [[_group_rule(alpha[layer, h], beta[layer, h], members[layer, h])
              for h in range(kv)] for layer in range(layers)]
    return rules


def _group_rule(alpha: float, beta: float, members: np.ndarray) -> Rule:
    """The rule of one GQA group: the widest ``(alpha, beta)``, full from ``beta >= 1``, with
    the members' own ``(alpha, beta)`` as query windows where they differ from it.  A group
    whose widest member is full but others are not keeps 64 sinks and a span of ``N`` (as
    wide as full) so that its narrower members keep MoA's sinks."""
    narrower = bool((members != [alpha, beta]).any()) and (members[:, 1] < 1).any()
    if not narrower:
        return Rule.full_attention() if beta >= 1 else Rule(
            sink=MOA_SINK, alpha=float(alpha), beta=float(beta))
    windows = tuple((float(a), float(b)) for a, b in members)
    if beta >= 1:
        return Rule(sink=MOA_SINK, alpha=0.0, beta=1.0, query_windows=windows)
    return Rule(sink=MOA_SINK, alpha=float(alpha), beta=float(beta), query_windows=windows)


def import_moa(path: str | os.PathLike, shape: ModelShape) -> Plan:
    """Read a MoA plan JSON for a model of ``shape``."""
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: a MoA plan is a JSON object with 'alphas' and 'betas'")
    if shape.group_size > 1:
        warnings.warn(f"MoA gives one rule per query head; moaplan keeps one per KV head and took "
                      f"the widest rule of each group of {shape.group_size} for the cache (the "
                      "prefill keeps each query head's span)", stacklevel=2)
    rules = moa_rules_from_json(data, shape.group_size)
    if len(rules) != shape.num_layers or len(rules[0]) != shape.num_key_value_heads:
        raise PlanError(f"{path}: MoA plan has {len(rules)} layers x "
                        f"{len(rules[0]) * shape.group_size} heads, the model has "
                        f"{shape.num_layers} x {shape.num_attention_heads}")
    return Plan(model=shape, rules=rules, provenance={"imported_from": f"moa:{path}"})


def duo_rules_from_gates(gates: np.ndarray, *, threshold: float | None = None,
                         sparsity: float | None = None, sink: int = 64,
                         recent: int = 256) -> list[list[Rule]]:
    """DuoAttention gates (layers x KV heads) to full vs ``sink + recent`` streaming rules.

    Give either ``threshold`` (gate above it: full) or ``sparsity`` (the share of heads made
    streaming, lowest gates first), as DuoAttention does.
    """
    if (threshold is None) == (sparsity is None):
        raise PlanError("give exactly one of threshold or sparsity to turn DuoAttention gates "
                        "into rules")
    if not np.isfinite(gates).all():
        raise PlanError("DuoAttention gates must be finite numbers; these hold NaN or infinity")
    if threshold is not None and not math.isfinite(threshold):
        raise PlanError(f"threshold must be a finite number, got {threshold}")
    if sparsity is not None:
        if not 0 <= sparsity <= 1:
            raise PlanError(f"sparsity must be in [0, 1], got {sparsity}")
        n_stream = int(round(sparsity * gates.size))
        order = np.argsort(gates, axis=None, kind="stable")
        full = np.ones(gates.size, dtype=bool)
        full[order[:n_stream]] = False
        full = full.reshape(gates.shape)
    else:
        full = gates > threshold
    stream = Rule.window(recent, sink=sink)
    return [[Rule.full_attention() if f else stream for f in row] for row in full]


def import_duo(path: str | os.PathLike, shape: ModelShape, *, threshold: float | None = None,
               sparsity: float | None = None, sink: int = 64, recent: int = 256) -> Plan:
    """Read DuoAttention's ``full_attention_heads.tsv`` (rows = layers, columns = KV heads)."""
    try:
        gates = np.loadtxt(_read(path).splitlines(), delimiter="\t", ndmin=2)
    except ValueError as err:
        raise PlanError(f"{path}: not a tab-separated table of numbers ({err})") from None
    if gates.shape != (shape.num_layers, shape.num_key_value_heads):
        raise PlanError(f"{path}: gates are {gates.shape[0]} layers x {gates.shape[1]} heads, "
                        f"the model has {shape.num_layers} x {shape.num_key_value_heads} KV heads")
    rules = duo_rules_from_gates(gates, threshold=threshold, sparsity=sparsity, sink=sink,
                                 recent=recent)
    return Plan(model=shape, rules=rules, provenance={"imported_from": f"duo:{path}"})
