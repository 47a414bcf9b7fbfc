"""The plan file: versioned YAML (``format: moaplan/1``), read with ``yaml.safe_load``.

Reading validates everything and reports every problem found, each naming the key it is
about, in one :class:`PlanError` line.  Writing is atomic.  Densities are written for the
reader's benefit (``predicted``) and recomputed from the rules on load.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from pathlib import Path
from typing import Any

from moaplan import __version__
from moaplan.errors import PlanError, RuleError
from moaplan.io import atomic_write_text, check_output, dump_yaml, file_head, load_yaml
from moaplan.plan.record import BUDGET_KINDS, Budget, Plan
from moaplan.rules import MAX_TOKENS, Rule, is_density
from moaplan.shape import ModelShape

FORMAT = "moaplan/1"
_TOP_KEYS = {"format", "model", "budget", "lengths", "rules", "predicted", "provenance"}
_MODEL_KEYS = {"num_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "model_type", "fingerprint"}
_RULE_KEYS = {"sink", "alpha", "beta", "min_span", "max_span", "compensate", "query_windows"}


def rule_to_yaml(rule: Rule) -> str | dict[str, Any]:
    if rule.full:
        return "full"
    out: dict[str, Any] = {"sink": rule.sink, "alpha": rule.alpha, "beta": rule.beta}
    if rule.min_span != 1:
        out["min_span"] = rule.min_span
    if rule.max_span is not None:
        out["max_span"] = rule.max_span
    if rule.compensate:
        out["compensate"] = True
    if rule.query_windows is not None:
        out["query_windows"] = [[alpha, beta] for alpha, beta in rule.query_windows]
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    dens = plan.densities(plan.lengths) if plan.lengths else None
    predicted: dict[int, dict[str, Any]] = {}
    for i, n in enumerate(plan.lengths):
        entry: dict[str, Any] = {
            "kv_density": round(float(dens["kv"][..., i].mean()), 6),
            "attention_density": round(float(dens["attention"][..., i].mean()), 6),
            "kv_density_per_layer": [round(float(x), 6) for x in dens["kv"][..., i].mean(1)],
            "attention_density_per_layer":
                [round(float(x), 6) for x in dens["attention"][..., i].mean(1)],
        }
        if n in plan.predicted_loss:
            entry["dropped_influence"] = float(plan.predicted_loss[n])
        predicted[int(n)] = entry
    shape = plan.model
    return {
        "format": FORMAT,
        "model": {"model_type": shape.model_type, "num_layers": shape.num_layers,
                  "num_attention_heads": shape.num_attention_heads,
                  "num_key_value_heads": shape.num_key_value_heads, "head_dim": shape.head_dim,
                  "fingerprint": shape.fingerprint},
        "budget": None if plan.budget is None else
        {"kind": plan.budget.kind, "value": plan.budget.value},
        "lengths": [int(n) for n in plan.lengths],
        "rules": [[rule_to_yaml(r) for r in layer] for layer in plan.rules],
        "predicted": predicted,
        "provenance": {"moaplan_version": __version__,
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       **plan.provenance},
    }


_HEADER = "# moaplan plan: one rule per (layer, KV head)\n"


def is_plan_file(path: Path) -> bool:
    """Whether ``path`` looks like a moaplan plan (what a plan may overwrite)."""
    head = file_head(path).decode("utf-8", errors="replace")
    return head.startswith(_HEADER) or f"\nformat: {FORMAT}\n" in f"\n{head}"


def check_plan_output(path: str | os.PathLike) -> Path:
    """Fail before any work unless a plan can be written to ``path`` (see
    :func:`moaplan.io.check_output`)."""
    return check_output(path, "plan file", is_plan_file)


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as YAML, atomically; never over a file that is not a plan."""
    path = check_plan_output(path)
    text = dump_yaml(plan_to_dict(plan), sort_keys=False, default_flow_style=None, width=100)
    return atomic_write_text(path, _HEADER + text)


class _Problems:
    """Collects every problem in a plan file, so the user fixes them all in one go."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def number(self, where: str, value: Any, *, integer: bool = False,
               minimum: float | None = 0, allow_none: bool = False) -> Any:
        if value is None and allow_none:
            return None
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        # An int is always finite (math.isfinite would overflow on a huge one).
        if isinstance(value, bool) or not ok_type or not (
                isinstance(value, int) or math.isfinite(value)):
            kind = "an integer" if integer else "a number"
            self.add(f"{where} must be {kind}, got {value!r}")
            return None
        if minimum is not None and value < minimum:
            self.add(f"{where} must be >= {minimum}, got {value!r}")
            return None
        return value

    def unknown_keys(self, where: str, data: dict, allowed: set[str]) -> None:
        extra = sorted(set(map(str, data)) - allowed)
        if extra:
            self.add(f"unknown key(s) {', '.join(extra)} in {where} "
                     f"(allowed: {', '.join(sorted(allowed))})")


def _parse_rule(where: str, raw: Any, problems: _Problems) -> Rule | None:
    if raw == "full":
        return Rule.full_attention()
    if not isinstance(raw, dict):
        problems.add(f"{where} must be 'full' or a mapping with sink/alpha/beta, got {raw!r}")
        return None
    problems.unknown_keys(where, raw, _RULE_KEYS)
    before = len(problems.items)
    sink = problems.number(f"{where}.sink", raw.get("sink", 0), integer=True)
    # alpha may be negative: an elastic rule `beta * N - sink` keeps a constant density.
    alpha = problems.number(f"{where}.alpha", raw.get("alpha", 0.0), minimum=None)
    beta = problems.number(f"{where}.beta", raw.get("beta", 0.0))
    min_span = problems.number(f"{where}.min_span", raw.get("min_span", 1), integer=True,
                               minimum=1)
    max_span = problems.number(f"{where}.max_span", raw.get("max_span"), integer=True,
                               minimum=1, allow_none=True)
    compensate = raw.get("compensate", False)
    if not isinstance(compensate, bool):
        problems.add(f"{where}.compensate must be true or false, got {compensate!r}")
    windows = _parse_query_windows(f"{where}.query_windows", raw.get("query_windows"), problems)
    if len(problems.items) > before:
        return None
    try:
        return Rule(sink=sink, alpha=float(alpha), beta=float(beta), min_span=min_span,
                    max_span=max_span, compensate=compensate, query_windows=windows)
    except RuleError as err:
        problems.add(f"{where}.{err}")
        return None


def _parse_query_windows(where: str, raw: Any,
                         problems: _Problems) -> tuple[tuple[float, float], ...] | None:
    """Optional per-query-head ``[[alpha, beta], ...]`` of a rule (see ``Rule``)."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or any(
            not isinstance(w, list) or len(w) != 2 for w in raw):
        problems.add(f"{where} must be a list of [alpha, beta] pairs, one per query head, "
                     f"got {raw!r}")
        return None
    pairs = [(problems.number(f"{where}[{i}][0]", a, minimum=None),
              problems.number(f"{where}[{i}][1]", b)) for i, (a, b) in enumerate(raw)]
    if any(None in pair for pair in pairs):
        return None
    return tuple((float(a), float(b)) for a, b in pairs)


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    """Validate a parsed plan file and build the :class:`Plan`, or raise one PlanError."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: not a moaplan plan (expected a YAML mapping with "
                        f"'format: {FORMAT}')")
    if data.get("format") != FORMAT:
        raise PlanError(f"{source}: unsupported plan format {data.get('format')!r}; this "
                        f"moaplan ({__version__}) reads '{FORMAT}'")
    problems = _Problems()
    problems.unknown_keys("the plan", data, _TOP_KEYS)

    model_raw = data.get("model")
    shape = None
    if not isinstance(model_raw, dict):
        problems.add("'model' must be a mapping with num_layers, num_attention_heads, "
                     "num_key_value_heads, head_dim")
    else:
        problems.unknown_keys("model", model_raw, _MODEL_KEYS)
        dims = {k: problems.number(f"model.{k}", model_raw.get(k), integer=True, minimum=1)
                for k in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim")}
        if None not in dims.values():
            if dims["num_attention_heads"] % dims["num_key_value_heads"]:
                problems.add("model.num_attention_heads must be a multiple of "
                             "model.num_key_value_heads")
            else:
                model_type = model_raw.get("model_type") or ""
                fingerprint = model_raw.get("fingerprint")
                if not isinstance(model_type, str):
                    problems.add(f"model.model_type must be a string, got {model_type!r}")
                elif fingerprint is not None and not isinstance(fingerprint, str):
                    problems.add(f"model.fingerprint must be a string, got {fingerprint!r}")
                else:
                    shape = ModelShape(**dims, model_type=model_type, fingerprint=fingerprint)

    budget = None
    budget_raw = data.get("budget")
    if budget_raw is not None:
        if not isinstance(budget_raw, dict) or set(budget_raw) != {"kind", "value"}:
            problems.add("'budget' must be a mapping with exactly 'kind' (kv or attention) "
                         "and 'value'")
        elif budget_raw["kind"] not in BUDGET_KINDS:
            problems.add(f"budget.kind must be 'kv' or 'attention', got {budget_raw['kind']!r}")
        else:
            value = problems.number("budget.value", budget_raw["value"])
            if value is not None and not is_density(value):
                problems.add(f"budget.value must be in (0, 1], got {value}")
            elif value is not None:
                budget = Budget(budget_raw["kind"], float(value))

    lengths_raw = data.get("lengths", [])
    lengths: list[int] = []
    if not isinstance(lengths_raw, list):
        problems.add(f"'lengths' must be a list of token counts, got {lengths_raw!r}")
    else:
        for i, n in enumerate(lengths_raw):
            value = problems.number(f"lengths[{i}]", n, integer=True, minimum=1)
            if value is not None and value > MAX_TOKENS:
                problems.add(f"lengths[{i}] must be <= {MAX_TOKENS}, got {value}")
            elif value is not None:
                lengths.append(value)
        if lengths != sorted(set(lengths)):
            problems.add(f"'lengths' must increase strictly (no repeats), got {lengths}")

    rules_raw = data.get("rules")
    rules: list[list[Rule]] = []
    if not isinstance(rules_raw, list):
        problems.add("'rules' must be a list (one per layer) of lists (one rule per KV head)")
    else:
        for layer, layer_raw in enumerate(rules_raw):
            if not isinstance(layer_raw, list):
                problems.add(f"rules[{layer}] must be a list with one rule per KV head")
                continue
            parsed = [_parse_rule(f"rules[{layer}][{h}]", r, problems)
                      for h, r in enumerate(layer_raw)]
            rules.append([r for r in parsed if r is not None])
        if shape is not None:
            if len(rules_raw) != shape.num_layers:
                problems.add(f"'rules' has {len(rules_raw)} layers but model.num_layers is "
                             f"{shape.num_layers}")
            for layer, layer_raw in enumerate(rules_raw):
                if isinstance(layer_raw, list) and len(layer_raw) != shape.num_key_value_heads:
                    problems.add(f"rules[{layer}] has {len(layer_raw)} rules but "
                                 f"model.num_key_value_heads is {shape.num_key_value_heads}")

    predicted_loss: dict[int, float] = {}
    predicted_raw = data.get("predicted") or {}
    if not isinstance(predicted_raw, dict):
        problems.add("'predicted' must be a mapping from length to figures")
    else:
        for n, entry in predicted_raw.items():
            if isinstance(n, bool) or not isinstance(n, int):
                problems.add(f"'predicted' keys must be lengths (whole numbers), got {n!r}")
            elif isinstance(entry, dict) and "dropped_influence" in entry:
                value = problems.number(f"predicted[{n}].dropped_influence",
                                        entry["dropped_influence"])
                if value is not None:
                    predicted_loss[int(n)] = float(value)

    provenance = data.get("provenance") or {}
    if not isinstance(provenance, dict):
        problems.add("'provenance' must be a mapping")
        provenance = {}

    if problems.items:
        raise PlanError(f"{source}: " + "; ".join(problems.items))
    assert shape is not None  # a missing shape is always reported above
    return Plan(model=shape, rules=rules, budget=budget, lengths=lengths,
                predicted_loss=predicted_loss, provenance=dict(provenance))


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a YAML plan file."""
    if not isinstance(path, (str, os.PathLike)):
        raise PlanError(f"load_plan takes the path of a plan file, got {type(path).__name__}")
    data = load_yaml(path, "plan file", PlanError)
    return plan_from_dict(data, source=str(path))


def as_plan(plan: Plan | str | os.PathLike) -> Plan:
    """``plan`` itself, or the plan loaded from a path; anything else is a PlanError."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    raise PlanError(f"expected a moaplan Plan or the path of a plan file, got "
                    f"{type(plan).__name__}")
