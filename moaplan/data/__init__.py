"""Calibration data for the profiler, and the standard-library text the project trains and
evaluates on."""

from moaplan.data.calibration import CalibrationSample, load_calibration, model_calibration
from moaplan.data.corpus import TextCorpus, stdlib_corpus

__all__ = [
    "CalibrationSample",
    "TextCorpus",
    "load_calibration",
    "model_calibration",
    "stdlib_corpus",
]
