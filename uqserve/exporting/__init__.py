"""Export trained members to ONNX bundles: a folder with ``manifest.json`` and one graph per member.

Four routes lead to a bundle:

- :func:`export_recipe`: a TOML recipe under ``export/``: train, then export;
- :func:`export_checkpoints`: a folder written by ``uqserve train``;
- :func:`export_onnx_members`: your own ONNX graphs (``[B,C,H,W] -> [B,K,H,W]``),
  wrapped into the member contract with the onnx API (no torch needed);
- :func:`export_nnunet`: an nnU-Net v2 trained model folder, one member per
  fold (the ``nnunet`` extra), written uncalibrated.

Every member is run through the runtime interface before the bundle is
written (torch exports: parity with PyTorch under identical noise, max abs
difference <= 1e-4), the bundle is calibrated by the ``calibrate`` function the caller passes
(``uqserve.calibration.calibrate_bundle``: exporting never imports
calibration, which sits above it; never for nnU-Net models), and it is written
atomically (a temp folder next to the target, renamed at the end).

Modules: ``_torch`` (export and parity), ``_onnx`` (signature and your own
graphs), ``_checkpoints``, ``_recipes``, ``_writer`` (the atomic bundle
folder), ``_plan`` (what a bundle is, :class:`ExportError`).
"""

from uqserve.exporting._checkpoints import export_checkpoints
from uqserve.exporting._nnunet import export_nnunet, load_nnunet_model
from uqserve.exporting._onnx import conform_signature, export_onnx_members, wrap_onnx_member
from uqserve.exporting._plan import OPSET, ExportError, ExportPlan
from uqserve.exporting._recipes import Recipe, export_recipe, load_recipe
from uqserve.exporting._torch import (
    PARITY_ATOL,
    check_parity,
    export_member,
    export_networks,
    parity_feeds,
)
from uqserve.exporting._writer import Calibrator, atomic_bundle_dir

__all__ = [
    "OPSET",
    "PARITY_ATOL",
    "Calibrator",
    "ExportError",
    "ExportPlan",
    "Recipe",
    "atomic_bundle_dir",
    "check_parity",
    "conform_signature",
    "export_checkpoints",
    "export_member",
    "export_networks",
    "export_nnunet",
    "export_onnx_members",
    "export_recipe",
    "load_nnunet_model",
    "load_recipe",
    "parity_feeds",
    "wrap_onnx_member",
]
