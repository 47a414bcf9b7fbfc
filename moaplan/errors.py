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
