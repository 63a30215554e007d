"""uqserve: segmentation with total, aleatoric and epistemic uncertainty, served.

The public API, importable from the package root::

    import uqserve
    with uqserve.Predictor("ssn-ensemble") as predictor:            # a bundle opened once
        pred = predictor.predict("scan.nii.gz")                     # a Prediction in memory
    result = uqserve.predict(["scan.nii.gz"], out_dir="out")      # files in, files out
    pred = uqserve.predict_volume(uqserve.read_volume("scan.nii.gz"))  # arrays in memory
    dec = uqserve.decompose(probs)                                  # [M, S, K, *sp] -> TU/AU/EU

Names are resolved lazily so that ``import uqserve`` stays cheap and never
imports onnxruntime or torch until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from uqserve._version import __version__

# name -> module that defines it
_EXPORTS = {
    "Accumulator": "uqserve.uncertainty",
    "Decomposition": "uqserve.uncertainty",
    "decompose": "uqserve.uncertainty",
    "Bundle": "uqserve.bundle",
    "BundleError": "uqserve.bundle",
    "Manifest": "uqserve.bundle",
    "load_bundle": "uqserve.bundle",
    "Volume": "uqserve.volumes",
    "VolumeError": "uqserve.volumes",
    "read_volume": "uqserve.volumes",
    "open_runtime": "uqserve.runtime",
    "Prediction": "uqserve.prediction",
    "Predictor": "uqserve.prediction",
    "RuntimeOptions": "uqserve.prediction",
    "PredictError": "uqserve.prediction",
    "Report": "uqserve.prediction",
    "ScanResult": "uqserve.prediction",
    "predict": "uqserve.prediction",
    "predict_volume": "uqserve.prediction",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # the real signatures for type checkers; at run time names load lazily
    from uqserve.bundle import Bundle as Bundle
    from uqserve.bundle import BundleError as BundleError
    from uqserve.bundle import Manifest as Manifest
    from uqserve.bundle import load_bundle as load_bundle
    from uqserve.prediction import PredictError as PredictError
    from uqserve.prediction import Prediction as Prediction
    from uqserve.prediction import Predictor as Predictor
    from uqserve.prediction import Report as Report
    from uqserve.prediction import RuntimeOptions as RuntimeOptions
    from uqserve.prediction import ScanResult as ScanResult
    from uqserve.prediction import predict as predict
    from uqserve.prediction import predict_volume as predict_volume
    from uqserve.runtime import open_runtime as open_runtime
    from uqserve.uncertainty import Accumulator as Accumulator
    from uqserve.uncertainty import Decomposition as Decomposition
    from uqserve.uncertainty import decompose as decompose
    from uqserve.volumes import Volume as Volume
    from uqserve.volumes import VolumeError as VolumeError
    from uqserve.volumes import read_volume as read_volume


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uqserve' has no attribute {name!r}")
