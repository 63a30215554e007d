"""Data: synthetic ambiguous slices and volumes, OOD shifts, users' annotated folders.

numpy/scipy only (nibabel for NIfTI, Pillow lazily for JPEG and PNG); no torch.
"""

from uqserve.contracts import PAPER_SHIFTS
from uqserve.data.folder import (
    Case,
    FolderDataset,
    FolderError,
    load_folder,
    write_example_folder,
    write_nifti,
)
from uqserve.data.shifts import SHIFTS, apply_shift, clahe
from uqserve.data.stats import normalization_stats
from uqserve.data.synthetic import (
    AMBIGUITIES,
    SyntheticImage,
    SyntheticSet,
    SyntheticVolume,
    dataset_seeds,
    make_dataset,
    make_slice,
    make_volume,
)

__all__ = [
    "AMBIGUITIES",
    "PAPER_SHIFTS",
    "SHIFTS",
    "Case",
    "FolderDataset",
    "FolderError",
    "SyntheticImage",
    "SyntheticSet",
    "SyntheticVolume",
    "apply_shift",
    "clahe",
    "dataset_seeds",
    "load_folder",
    "make_dataset",
    "make_slice",
    "make_volume",
    "normalization_stats",
    "write_example_folder",
    "write_nifti",
]
