"""An nnU-Net model folder's files, read as untrusted input.

A trained model folder is shared like data, but a ``.pth`` checkpoint is a
pickle: loaded with full pickle it can run any code. Checkpoints are
therefore read with ``torch.load(weights_only=True)`` and an allow-list of
exactly the types nnU-Net v2's ``nnUNetTrainer.save_checkpoint`` writes
(:func:`checkpoint_types`); anything else is refused with one line naming
the type. The predictor is then initialised from what was read
(``nnUNetPredictor.manual_initialization``), never by nnU-Net's own folder
loader, which unpickles with ``weights_only=False``.

``dataset.json``, ``plans.json`` and the checkpoints are checked for what
the export needs, each failure one :class:`ExportError` naming the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uqserve._fs import read_json_object
from uqserve.exporting._plan import ExportError, refuse_repeated_members

_BROKEN = "re-run nnUNetv2_train or pass the folder it wrote"


def checkpoint_types() -> list[Any]:
    """The non-builtin types an nnU-Net v2 checkpoint holds, for ``weights_only`` loading.

    Tensors, dicts, lists and ``torch.device`` (``init_args``) are allowed by
    torch already; the training log and ``_best_ema`` hold numpy scalars
    (``np.nanmean`` of the Dice per class), pickled as
    ``numpy.core.multiarray.scalar`` (``numpy._core`` by numpy 2) with their dtype.
    """
    import numpy as np

    scalar = np.core.multiarray.scalar  # type: ignore[attr-defined]
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64")]
    return [scalar, (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """One fold's checkpoint, unpickled with the allow-list only; checked for what export needs."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):  # torch.save's format; a truncated file has no directory
        raise ExportError(
            f"{path}: not a PyTorch checkpoint (no zip archive: truncated, or not written by "
            f"torch.save); {_BROKEN}"
        )
    try:
        with torch.serialization.safe_globals(checkpoint_types()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise ExportError(
                f"{path}: holds the type {found.group(1)}, which nnU-Net checkpoints never "
                "hold; refused (loading it could run code): use a checkpoint that "
                "nnUNetv2_train wrote"
            ) from None
        raise ExportError(
            f"{path}: not a PyTorch checkpoint ({_first_line(exc)}); {_BROKEN}"
        ) from None
    except Exception as exc:  # the unpickler fails in any way on corrupt bytes
        raise ExportError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
            f"{_first_line(exc)}); the file is corrupt: {_BROKEN}"
        ) from None
    _check_checkpoint(ckpt, path)
    return dict(ckpt)


def _check_checkpoint(ckpt: Any, path: Path) -> None:
    import torch

    ok = (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("network_weights"), dict)
        and all(isinstance(v, torch.Tensor) for v in ckpt["network_weights"].values())
        and isinstance(ckpt.get("trainer_name"), str)
        and isinstance(ckpt.get("init_args"), dict)
        and isinstance(ckpt["init_args"].get("configuration"), str)
    )
    if not ok:
        raise ExportError(
            f"{path}: not an nnU-Net checkpoint (needs network_weights, trainer_name and "
            f"init_args.configuration); {_BROKEN}"
        )


def weights_sha256(weights: dict[str, Any]) -> str:
    """sha256 over a state dict's names and tensor bytes (any dtype), in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_json(path: Path) -> dict[str, Any]:
    """``dataset.json`` or ``plans.json`` as a dict, or one line naming the file."""
    return read_json_object(path, ExportError, _BROKEN)


def _check_dataset_json(dataset: dict[str, Any], path: Path) -> None:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or len(labels) < 2:
        raise ExportError(
            f"{path}: needs 'labels' with a name for each label value (background 0 "
            f"first), got {labels!r:.80}; {_BROKEN}"
        )
    if not isinstance(dataset.get("channel_names", dataset.get("modality")), dict):
        raise ExportError(f"{path}: needs 'channel_names' (one per input channel); {_BROKEN}")


def initialize_predictor(
    predictor: Any, folder: Path, folds: Sequence[str], checkpoint: str
) -> None:
    """``predictor.initialize_from_trained_model_folder``, with checkpoints read safely.

    The same steps as nnU-Net's (plans and dataset, the trainer's
    ``build_network_architecture``, one parameter set per fold), but every
    checkpoint goes through :func:`load_checkpoint` and each failure names its file.
    """
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_path = folder / "dataset.json"
    dataset = read_json(dataset_path)
    _check_dataset_json(dataset, dataset_path)
    pm = PlansManager(read_json(folder / "plans.json"))
    paths = [folder / f"fold_{f}" / checkpoint for f in folds]
    ckpts = [load_checkpoint(p) for p in paths]
    refuse_repeated_members(
        [
            (str(p), weights_sha256(ck["network_weights"]))
            for p, ck in zip(paths, ckpts, strict=True)
        ]
    )
    first = ckpts[0]
    trainer_name, configuration = first["trainer_name"], first["init_args"]["configuration"]
    try:
        cm = pm.get_configuration(configuration)
        num_in = determine_num_input_channels(pm, cm, dataset)
        num_out = pm.get_label_manager(dataset).num_segmentation_heads
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise ExportError(
            f"{folder / 'plans.json'}: does not fit {dataset_path.name} and the checkpoint "
            f"({_first_line(exc)}); {_BROKEN}"
        ) from None
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if trainer_class is None:
        raise ExportError(
            f"{paths[0]}: trainer {trainer_name!r} is not one of nnunetv2's trainers; "
            "install the package that defines it, or export a standard nnUNetTrainer model"
        )
    network = _build_network(trainer_class, pm, cm, num_in, num_out)
    for path, ck in zip(paths, ckpts, strict=True):
        try:
            network.load_state_dict(ck["network_weights"])
        except RuntimeError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            raise ExportError(
                f"{path}: its weights do not fit the network that plans.json and "
                f"{dataset_path.name} describe ({num_out} labels, {num_in} channels; "
                f"{lines[min(1, len(lines) - 1)][:160]}); check that dataset.json's labels "
                "are the ones it was trained with"
            ) from None
    network.load_state_dict(ckpts[0]["network_weights"])
    predictor.manual_initialization(
        network, pm, cm, [ck["network_weights"] for ck in ckpts], dataset, trainer_name,
        first.get("inference_allowed_mirroring_axes"),
    )  # fmt: skip


def _build_network(trainer_class: Any, pm: Any, cm: Any, num_in: int, num_out: int) -> Any:
    """The trainer's network, as nnU-Net's predictor builds it (either signature)."""
    import inspect

    build = trainer_class.build_network_architecture
    if "plans_manager" in inspect.signature(build).parameters:
        return build(pm, cm, num_in, num_out, enable_deep_supervision=False)
    return build(
        cm.network_arch_class_name, cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import, num_in, num_out, enable_deep_supervision=False,
    )  # fmt: skip
