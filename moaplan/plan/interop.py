"""Import the plans of earlier systems: MoA's plan JSON and DuoAttention's head gates."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace

import numpy as np

from moaplan.errors import PlanError
from moaplan.io import read_text
from moaplan.plan.record import Plan
from moaplan.rules import Rule
from moaplan.shape import ModelShape

# A MoA plan JSON or a DuoAttention gate table of the largest models is a few hundred KiB.
MAX_IMPORT_BYTES = 64 * 2**20

MOA_SINK = 64  # MoA's plans always keep 64 initial tokens


def _read(path: str | os.PathLike) -> str:
    return read_text(path, "file", MAX_IMPORT_BYTES, PlanError)


def widest_rule(alphas: np.ndarray, betas: np.ndarray, sink: int = MOA_SINK) -> Rule:
    """One rule at least as wide as every ``alpha + beta * N`` window of a GQA group, and
    exactly the widest of them at every length past their last crossing.

    The widest window at a length is a maximum of lines, which one rule does not hold in
    general; it is the steepest line (the largest ``alpha`` among equal slopes), raised by
    ``min_span`` to what each other member reaches before the steepest overtakes it (a
    constant member: its own span).  A negative ``alpha`` is legal: MoA's ``-1024 + 1.0 N``
    is every token but the oldest 1024.  A steepest line with ``beta >= 1`` and
    ``alpha >= 0`` sees everything: a full rule.
    """
    top = max(range(len(alphas)), key=lambda k: (betas[k], alphas[k]))
    alpha, beta = float(alphas[top]), float(betas[top])
    if beta >= 1 and alpha >= 0:
        return Rule.full_attention()
    reach = 1.0
    for a, b in zip(alphas, betas):
        if b < beta:  # it is wider until the steepest line crosses it (at N < 0: never)
            crossing = max(0.0, (a - alpha) / (beta - b))
            reach = max(reach, a + b * crossing)
        # equal slopes: the steepest has the largest alpha, so it is never narrower
    return Rule(sink=sink, alpha=alpha, beta=beta, min_span=int(np.ceil(reach)))


def moa_rules_from_json(data: dict, group_size: int) -> list[list[Rule]]:
    """Rules per (layer, KV head) from MoA's ``{"alphas": [[...]], "betas": [[...]]}``.

    MoA gives one ``(alpha, beta)`` per *query* head with span ``alpha + beta * N`` and a
    64-token sink; moaplan keeps one rule per KV head so the cache really shrinks, and takes
    the widest rule of each GQA group (:func:`widest_rule`).  MoA's plans pair negative
    alphas with positive betas (``-1024 + N``); a negative beta is not a MoA plan.  Where the
    members of a group differ, the rule keeps them as its ``query_windows``: the prefill
    computes each query head's own span, the cache the widest.
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
    if not (np.isfinite(alphas).all() and np.isfinite(betas).all()):
        raise PlanError("MoA plan has alphas or betas that are not finite numbers")
    if (betas < 0).any():
        raise PlanError("MoA plan has negative betas (a span cannot shrink as the input grows)")
    layers, heads = alphas.shape
    kv = heads // group_size
    groups = [(alphas[layer].reshape(kv, group_size), betas[layer].reshape(kv, group_size))
              for layer in range(layers)]
    return [[_group_rule(a[h], b[h]) for h in range(kv)] for a, b in groups]


def _group_rule(alphas: np.ndarray, betas: np.ndarray) -> Rule:
    """The rule of one GQA group: :func:`widest_rule` of its members, with the members' own
    ``(alpha, beta)`` as query windows where they differ (each capped at the rule's span, so
    never wider than what the cache keeps).  A group whose widest member is full but others
    are not keeps 64 sinks and a span of ``N`` (as wide as full) so that its narrower members
    keep MoA's sinks."""
    rule = widest_rule(alphas, betas)
    members = np.stack([alphas, betas], -1)
    member_full = (members[:, 1] >= 1) & (members[:, 0] >= 0)
    if (members == members[0]).all() or member_full.all():
        return rule
    windows = tuple((float(a), float(b)) for a, b in members)
    if rule.full:
        return Rule(sink=MOA_SINK, alpha=0.0, beta=1.0, query_windows=windows)
    return replace(rule, query_windows=windows)


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
