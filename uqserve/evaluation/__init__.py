"""Evaluation internals: data sets, the metric core, the runner, tables and figures.

The public entry points are ``uqserve.evaluate.evaluate`` and
``uqserve.evaluate.calibrate``.
"""

from uqserve.evaluation.core import (
    AGGREGATORS,
    NO_EU,
    PAPER,
    UQSERVE,
    BundleEvaluation,
    ImagePrediction,
    convention_for,
    to_convention,
)
from uqserve.evaluation.sets import EvalImage, EvaluationError, SetSpec

__all__ = [
    "AGGREGATORS",
    "NO_EU",
    "PAPER",
    "UQSERVE",
    "BundleEvaluation",
    "EvalImage",
    "EvaluationError",
    "ImagePrediction",
    "SetSpec",
    "convention_for",
    "to_convention",
]
