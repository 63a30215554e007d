"""Regenerate examples/example.nii.gz: a small synthetic scan for `uqserve predict`.

    .venv/bin/python examples/make_example.py

128 x 128 x 24 voxels, 0.8 x 0.8 x 3 mm, from uqserve.data.make_volume (seed 7,
high ambiguity), so the shipped models see data like their training data.
Stored as int16 with scl_slope/scl_inter (as scanners do), which halves the file.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from uqserve.data import make_volume

HERE = Path(__file__).resolve().parent


def main() -> Path:
    vol = make_volume(seed=7, shape=(128, 128, 24), spacing=(0.8, 0.8, 3.0), ambiguity="high")
    img = nib.Nifti1Image(vol.volume.data.astype(np.float32), vol.volume.affine)
    img.set_qform(vol.volume.affine, code=1)
    img.set_sform(vol.volume.affine, code=1)
    img.set_data_dtype(np.int16)  # nibabel picks scl_slope/scl_inter to fit the range
    img.header.set_xyzt_units("mm", "sec")
    out = HERE / "example.nii.gz"
    nib.save(img, str(out))
    return out


if __name__ == "__main__":
    print(main())
