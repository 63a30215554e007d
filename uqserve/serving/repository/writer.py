"""Write a bundle's Triton model repository, atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from uqserve._fs import replace_dir_atomically
from uqserve.bundle import Bundle, load_bundle, name_problem
from uqserve.serving.repository.configs import (
    VERSION,
    RepositoryError,
    _config_text,
    ensemble_config,
    member_config,
    reduce_config,
    reduced_ensemble_config,
)
from uqserve.serving.repository.validate import (
    validate_repository,
)

FLAVOURS = ("python", "onnxruntime")
MEMBER_FILES = ("copy", "symlink")
REDUCE_MODES = ("client", "server")
# The generic Triton python model, beside this package (``uqserve/serving/``).
TEMPLATE = Path(__file__).resolve().parents[1] / "python_model.py"

BundleLike = Bundle | str | os.PathLike[str]


def write_repository(
    bundle: BundleLike | Sequence[BundleLike] | None,
    out_dir: str | os.PathLike[str],
    flavour: str = "python",
    *,
    member_files: str = "copy",
    max_batch_size: int = 32,
    instances: int | None = None,
    threads: int | None = None,
    max_inflight_requests: int | None = None,
    max_queue_delay_us: int = 1000,
    reduce: str = "client",
    overwrite: bool = False,
) -> Path:
    """Write a Triton model repository for one or several bundles to ``out_dir``.

    ``flavour``: ``python`` (CPU, pip-installed tritonserver) or ``onnxruntime``
    (GPU, NGC image). ``member_files``: ``copy`` makes a self-contained
    repository; ``symlink`` links each ``model.onnx`` to the bundle's file
    (and the python flavour's ``model.py`` to uqserve's template) with a
    relative path (no duplicated bytes; used for the committed
    ``model_repository/``). ``instances`` per member defaults to 2 for python
    (two batches in flight per member) and 1 for onnxruntime (one per GPU).
    ``threads`` (onnxruntime intra-op threads per instance) defaults to cores /
    (instances x members), decided on the serving machine at load time.
    ``max_inflight_requests`` bounds the requests in flight at each ensemble
    step (memory); it defaults to 16 for onnxruntime and is left out (0) for
    python, because the Triton 2.51 of nvidia-pytriton rejects the field.
    ``reduce``: ``client`` (the members' outputs go to the client) or
    ``server`` (a reduction step and the ``<bundle>_reduced`` ensemble are
    added; needs the ``onnx`` package).

    The repository is written to a temporary sibling folder and renamed, so a
    failure leaves nothing behind. Returns ``out_dir``.
    """
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    if reduce not in REDUCE_MODES:
        raise RepositoryError(f"unknown reduce {reduce!r}: use one of {', '.join(REDUCE_MODES)}")
    if member_files not in MEMBER_FILES:
        raise RepositoryError(
            f"unknown member_files {member_files!r}: use one of {', '.join(MEMBER_FILES)}"
        )
    for name, value, low in (
        ("max_batch_size", max_batch_size, 1),
        ("instances", instances, 1),
        ("threads", threads, 1),
        ("max_inflight_requests", max_inflight_requests, 0),
        ("max_queue_delay_us", max_queue_delay_us, 0),
    ):
        if value is not None and (not isinstance(value, int) or value < low):
            raise RepositoryError(f"{name} must be an integer >= {low}, got {value!r}")
    if bundle is None or isinstance(bundle, Bundle | str | os.PathLike):
        specs: list[BundleLike | None] = [bundle]
    else:
        specs = list(bundle)
    if not specs:
        raise RepositoryError("no bundle given: pass at least one bundle")
    bundles = [load_bundle(b) if not isinstance(b, Bundle) else b for b in specs]
    names = [b.manifest.name for b in bundles]
    if len(set(names)) != len(names):
        raise RepositoryError(f"bundle names must differ within one repository, got {names}")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RepositoryError(f"{out}: folder is not empty; pass `overwrite=True` to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if instances is None:
        instances = 2 if flavour == "python" else 1
    if max_inflight_requests is None:
        max_inflight_requests = 0 if flavour == "python" else 16

    # Servers may run as another user: the folder is opened up to 0755.
    with replace_dir_atomically(out) as tmp:
        for b in bundles:
            _write_bundle(
                b,
                tmp,
                final=out,
                flavour=flavour,
                member_files=member_files,
                max_batch_size=max_batch_size,
                instances=instances,
                threads=threads,
                max_inflight_requests=max_inflight_requests,
                max_queue_delay_us=max_queue_delay_us,
                reduce=reduce,
            )
        validate_repository(tmp)
    return out


def _write_bundle(
    bundle: Bundle,
    root: Path,
    *,
    final: Path,
    flavour: str,
    member_files: str,
    max_batch_size: int,
    instances: int,
    threads: int | None,
    max_inflight_requests: int,
    max_queue_delay_us: int,
    reduce: str,
) -> None:
    m = bundle.manifest
    for member in range(m.num_members):
        config = member_config(
            bundle,
            member,
            flavour,
            max_batch_size=max_batch_size,
            instances=instances,
            threads=threads,
            max_queue_delay_us=max_queue_delay_us,
        )
        version_dir = _model_dir(root, config.name)
        (version_dir.parent / "config.pbtxt").write_text(_config_text(config, flavour, m.name))
        files = {"model.onnx": bundle.member_path(member).resolve()}
        if flavour == "python":
            files["model.py"] = TEMPLATE
        # Links are relative to where they will live after the rename (same depth as tmp).
        final_dir = final.resolve() / config.name / VERSION
        for name, source in files.items():
            if member_files == "symlink":
                (version_dir / name).symlink_to(os.path.relpath(source, final_dir))
            else:
                shutil.copyfile(source, version_dir / name)
    for samples in (True, False):
        config = ensemble_config(
            bundle,
            max_batch_size=max_batch_size,
            max_inflight_requests=max_inflight_requests,
            samples=samples,
            reduce=reduce,
        )
        _write_ensemble(root, config, flavour, m.name)
    if reduce == "server":
        _write_reduce(
            bundle, root, flavour, max_batch_size=max_batch_size,
            max_inflight_requests=max_inflight_requests, max_queue_delay_us=max_queue_delay_us,
        )  # fmt: skip


def _model_dir(root: Path, model: str) -> Path:
    """Create ``root/model/VERSION``: the one place a model name becomes a path.

    A name that would leave ``root`` (``..``, ``/``, an absolute path) or is
    not a valid model name is refused before anything is created.
    """
    base = root.resolve()
    folder = (base / model).resolve()
    if name_problem(model) or folder.parent != base or not folder.is_relative_to(base):
        raise RepositoryError(
            f"model name {model!r} is not a folder name inside the repository; "
            "rename the bundle (letters, digits, '_', '-', '.')"
        )
    version_dir = folder / VERSION
    version_dir.mkdir(parents=True)
    return version_dir


def _write_ensemble(root: Path, config: mc.ModelConfig, flavour: str, bundle_name: str) -> None:
    version_dir = _model_dir(root, config.name)
    # Triton needs the version folder even for an ensemble; git keeps no empty folders.
    (version_dir / ".gitkeep").write_text("")
    (version_dir.parent / "config.pbtxt").write_text(_config_text(config, flavour, bundle_name))


def _write_reduce(
    bundle: Bundle,
    root: Path,
    flavour: str,
    *,
    max_batch_size: int,
    max_inflight_requests: int,
    max_queue_delay_us: int,
) -> None:
    """The reduction model (a generated graph, always a file) and its ensemble."""
    from uqserve.serving.reduce import reduce_graph

    m = bundle.manifest
    config = reduce_config(
        bundle, flavour, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us
    )
    version_dir = _model_dir(root, config.name)
    (version_dir.parent / "config.pbtxt").write_text(_config_text(config, flavour, m.name))
    graph = reduce_graph(m.num_members, m.num_classes, m.num_samples, dims=m.input.dims)
    (version_dir / "model.onnx").write_bytes(graph)
    if flavour == "python":
        shutil.copyfile(TEMPLATE, version_dir / "model.py")
    ensemble = reduced_ensemble_config(
        bundle, max_batch_size=max_batch_size, max_inflight_requests=max_inflight_requests
    )
    _write_ensemble(root, ensemble, flavour, m.name)
