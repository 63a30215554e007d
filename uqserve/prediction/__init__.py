"""The predict pipeline: a volume in, segmentation + TU/AU/EU maps + report out.

Used by ``uqserve predict``, the sidecar and ``evaluate``. From Python:

```python
import uqserve
with uqserve.Predictor("ssn-ensemble") as predictor:         # opened once
    pred = predictor.predict("scan.nii.gz")                      # arrays in memory
    results = predictor.predict_files(["a.nii.gz"], "out")      # files in, files out
results = uqserve.predict(["scan.nii.gz"], "out")             # one call: open, write, close
```

One module per step, in the order a volume meets them:

| module | step |
| --- | --- |
| `options` | option checks (seed, batch size, channels); `PredictError` |
| `intensity` | non-finite voxels out; the bundle's normalisation |
| `crop` | the nonzero bounding box (`input.crop_nonzero`) and back |
| `resample` | reorientation and resampling onto the model's grid, and back |
| `frame` | the scan's grid -> the model grid and back (`resample` for each map) |
| `geometry` | volume `[X, Y, Z]` <-> batches of padded 2D slices and back |
| `windows` | sliding windows over slices or volumes larger than the patch |
| `accumulate` | member outputs -> running sums (`Accumulator`), counts, labels |
| `stitch` | windows' member outputs -> each member's maps on the model grid |
| `scoring` | segmentation, image scores, OOD decision, entanglement, volumes |
| `report` | the typed `Report` written as report.json |
| `pipeline` | `predict_volume`: the steps above chained, `Prediction` |
| `files` | the scan loop: reading, predicting, atomic writing |
| `predictor` | `Predictor`: a bundle opened once for many scans; `predict` |
| `preview` | the optional preview.png |
| `_display` | preview.png's orientation letters, slice choice and colour-bar ticks |
"""

from __future__ import annotations

from uqserve.prediction.accumulate import ProgressFn
from uqserve.prediction.files import (
    DEFAULT_OUT_DIR,
    OUTPUT_FILES,
    ScanResult,
    collect_scans,
    input_sha256,
    write_outputs,
)
from uqserve.prediction.options import PredictError
from uqserve.prediction.pipeline import Prediction, predict_volume
from uqserve.prediction.predictor import Predictor, RuntimeOptions, predict
from uqserve.prediction.report import Report, report_json

__all__ = [
    "DEFAULT_OUT_DIR",
    "OUTPUT_FILES",
    "PredictError",
    "Prediction",
    "Predictor",
    "ProgressFn",
    "Report",
    "RuntimeOptions",
    "ScanResult",
    "collect_scans",
    "input_sha256",
    "predict",
    "predict_volume",
    "report_json",
    "write_outputs",
]
