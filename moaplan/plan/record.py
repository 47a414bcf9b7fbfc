"""The plan: one rule per (layer, KV head), the model it was made for, and its provenance.

A plan is a record; reading and writing it as YAML lives in :mod:`moaplan.plan.yaml_format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moaplan.errors import PlanError
from moaplan.rules import DENSITY_KINDS, Rule, density, is_density
from moaplan.shape import ModelShape

BUDGET_KINDS = DENSITY_KINDS  # a budget limits one density


@dataclass(frozen=True)
class Budget:
    kind: str  # "kv": KV-cache density; "attention": prefill attention density
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise PlanError(f"budget kind {self.kind!r} is not one of {', '.join(BUDGET_KINDS)}")
        if not is_density(self.value):
            raise PlanError(f"budget {self.value} is outside (0, 1]; it is a density")


@dataclass
class Plan:
    """One rule per (layer, KV head) for one model.

    ``predicted_loss`` maps a length to the optimizer's predicted (normalised) dropped
    influence; densities are never stored here because they follow from the rules
    (:meth:`densities`).
    """

    model: ModelShape
    rules: list[list[Rule]]
    budget: Budget | None = None
    lengths: list[int] = field(default_factory=list)
    predicted_loss: dict[int, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.rules) != self.model.num_layers:
            raise PlanError(f"plan has rules for {len(self.rules)} layers but the model has "
                            f"{self.model.num_layers}")
        for layer, layer_rules in enumerate(self.rules):
            if len(layer_rules) != self.model.num_key_value_heads:
                raise PlanError(f"layer {layer} has {len(layer_rules)} rules but the model has "
                                f"{self.model.num_key_value_heads} KV heads (one rule per KV head)")
            for head, rule in enumerate(layer_rules):
                windows = rule.query_windows
                if windows is not None and len(windows) != self.model.group_size:
                    raise PlanError(f"layer {layer} KV head {head} has {len(windows)} query "
                                    f"windows but the model has {self.model.group_size} query "
                                    "heads per KV head")

    @property
    def flat_rules(self) -> list[Rule]:
        """All rules, layer-major: index ``layer * num_kv_heads + head``."""
        return [rule for layer_rules in self.rules for rule in layer_rules]

    def densities(self, lengths: list[int] | np.ndarray) -> dict[str, np.ndarray]:
        """KV and attention densities, ``(num_layers, num_kv_heads, len(lengths))`` each (a
        compensation token counts as one key, see :func:`moaplan.rules.density`)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        shape = (self.model.num_layers, self.model.num_key_value_heads, len(lengths))
        return {kind: density(self.flat_rules, lengths, kind).reshape(shape)
                for kind in DENSITY_KINDS}

    def check_model(self, config: Any, *, strict: bool = True) -> None:
        """Raise :class:`PlanError` if this plan does not fit the model with ``config``.

        The shape must always match; with ``strict`` the config fingerprint must match too
        (a plan made for one model's heads says little about another model's heads).
        """
        shape = ModelShape.from_config(config)
        if not self.model.same_shape(shape):
            raise PlanError(f"the plan is for a model with {self.model.describe()}, but this model "
                            f"has {shape.describe()}; make a plan for this model with "
                            "`moaplan search --model ...`")
        if strict and self.model.fingerprint and self.model.fingerprint != shape.fingerprint:
            raise PlanError(f"the plan was made for another {self.model.model_type or 'model'} "
                            f"(config fingerprint {self.model.fingerprint}, this model has "
                            f"{shape.fingerprint}); pass --force (in Python: strict=False) to "
                            "use it anyway")
