"""User-facing errors: each carries one line that says what is wrong and how to fix it.

The CLI prints these without a traceback; anything else escaping is a bug in moaplan.
"""


class MoaplanError(Exception):
    """Base class of errors caused by the user's input (files, arguments, models)."""


class PlanError(MoaplanError):
    """A plan file or plan object is malformed or does not fit the model."""


class ProfileError(MoaplanError):
    """A profile file is malformed, or was made for another model or rule space."""


class BudgetError(MoaplanError):
    """A density budget that the rule space cannot meet."""


class ModelError(MoaplanError):
    """A model that moaplan cannot handle (architecture, dtype, shape)."""


class DataError(MoaplanError):
    """Calibration or evaluation data that cannot be read or is too short."""


class RuleError(PlanError, ValueError):
    """A rule whose numbers are out of range (also a ValueError, as ``Rule`` always raised)."""


def one_line(text: str, limit: int = 400) -> str:
    """``text`` as one line of at most ``limit`` characters: errors from libraries (YAML,
    tokenizers, safetensors) often span several lines, and the CLI promises one."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
