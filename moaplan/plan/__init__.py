"""Plans: one rule per (layer, KV head), their YAML file, imports and baselines."""

from moaplan.plan.baselines import best_duo_plan, duo_plan, uniform_plan, uniform_rule
from moaplan.plan.interop import import_duo, import_moa
from moaplan.plan.record import Budget, Plan
from moaplan.plan.yaml_format import (
    FORMAT,
    as_plan,
    check_plan_output,
    load_plan,
    plan_from_dict,
    plan_to_dict,
    save_plan,
)

# re-exported: the model shape lives in moaplan.shape (the profiler needs it too)
from moaplan.shape import ModelShape, config_fingerprint

__all__ = [
    "FORMAT", "Budget", "ModelShape", "Plan", "as_plan", "best_duo_plan", "check_plan_output",
    "config_fingerprint", "duo_plan", "import_duo", "import_moa", "load_plan", "plan_from_dict",
    "plan_to_dict", "save_plan", "uniform_plan", "uniform_rule",
]
