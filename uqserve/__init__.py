"""uqserve: segmentation with total, aleatoric and epistemic uncertainty, served.

The public API, importable from the package root::

    import uqserve
    result = uqserve.predict(["scan.nii.gz"], out_dir="out")      # files in, files out
    pred = uqserve.predict_volume(uqserve.read_volume("scan.nii.gz"))  # arrays in memory
    dec = uqserve.decompose(probs)                                  # [M, S, K, *sp] -> TU/AU/EU

Names are resolved lazily so that ``import uqserve`` stays cheap and never
imports onnxruntime or torch until they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
    "Prediction": "uqserve.predict",
    "PredictError": "uqserve.predict",
    "predict_volume": "uqserve.predict",
}

__all__ = ["__version__", "predict", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "predict":
        # The module is callable: `uqserve.predict(scans, out_dir)` runs the pipeline.
        return importlib.import_module("uqserve.predict")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uqserve' has no attribute {name!r}")
