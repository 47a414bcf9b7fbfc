"""Calibration data for the profiler, and the standard-library text the project trains and
evaluates on."""

from moaplan.data.calibration import (
    CalibrationFile,
    CalibrationSample,
    load_calibration,
    model_calibration,
)
from moaplan.data.corpus import TextCorpus, stdlib_corpus

__all__ = [
    "CalibrationFile",
    "CalibrationSample",
    "TextCorpus",
    "load_calibration",
    "model_calibration",
    "stdlib_corpus",
]
