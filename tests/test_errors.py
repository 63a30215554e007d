"""One error family: every uqserve error derives from ``uqserve.errors``, and the CLI
prints uqserve's errors as one line (with flags for parameters) but bugs with a traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import uqserve
from uqserve.errors import ServiceError, UqserveError, UsageError

# Runs inside tritonserver's Python backend, standalone: it must not import uqserve.
STANDALONE = {"uqserve.serving.python_model"}


def _uqserve_modules() -> list[str]:
    names = [
        m.name
        for m in pkgutil.walk_packages(uqserve.__path__, "uqserve.")
        if m.name not in STANDALONE
    ]
    assert "uqserve.prediction.pipeline" in names and "uqserve.cli.predict" in names
    return names


def test_every_error_class_is_in_the_family() -> None:
    found: dict[str, type[BaseException]] = {}
    for name in _uqserve_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and not attr.startswith("_")  # the CLI's private SIGTERM marker
            ):
                found[f"{name}.{attr}"] = obj
    # The ones the family was made for, so that the scan cannot pass by finding nothing.
    for expected in (
        "uqserve.volumes.base.VolumeError",
        "uqserve.volumes.io.OutputError",
        "uqserve.bundle.BundleError",
        "uqserve.prediction.options.PredictError",
        "uqserve.runtime.base.RuntimeServiceError",
        "uqserve.runtime.triton.servers.TritonMismatchError",
        "uqserve.serving.launcher.ServerError",
        "uqserve.training.config.TrainError",
        "uqserve.evaluation.sets.EvaluationError",
        "uqserve.sidecar.service.PermanentError",
    ):
        assert expected in found, f"{expected} not found; the scan is broken"
    outside = [n for n, cls in found.items() if not issubclass(cls, UqserveError)]
    assert not outside, f"error classes outside uqserve.errors' family: {outside}"
    both = [
        n for n, c in found.items() if issubclass(c, UsageError) and issubclass(c, ServiceError)
    ]
    assert not both
    for name, cls in found.items():
        assert issubclass(cls, (UsageError, ServiceError)) or cls is UqserveError, name
    assert issubclass(found["uqserve.runtime.base.RuntimeServiceError"], RuntimeError)
    assert issubclass(found["uqserve.bundle.BundleError"], ValueError)


def test_no_builtin_name_is_shadowed() -> None:
    import builtins

    for name in _uqserve_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == name:
                stripped = attr.rstrip("_")
                assert not hasattr(builtins, stripped) or stripped == attr, f"{name}.{attr}"


def test_library_messages_name_parameters_and_the_cli_maps_them(tmp_path: Path) -> None:
    from uqserve.cli._common import cli_message
    from uqserve.volumes import OutputError, atomic_output_dir

    (tmp_path / "scan").mkdir()
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(tmp_path / "scan"):
            pass
    message = str(info.value)
    assert "`overwrite=True`" in message and "`out_dir`" in message and "--" not in message
    shown = cli_message(message)
    assert "pass --overwrite or choose another --out" in shown and "`" not in shown
    # Values, False and unknown names.
    assert cli_message('use `device="cpu"`') == "use --device cpu"
    assert cli_message("or pass `figures=False`") == "or pass --no-figures"
    assert cli_message("start `uqserve serve` first") == "start `uqserve serve` first"


def _app_with(raises: BaseException) -> object:
    """A uqserve CLI app (the real ``_App``) with one command that raises ``raises``."""
    from uqserve.cli import _App

    app = _App()

    @app.command()
    def boom() -> None:
        raise raises

    @app.command()
    def other() -> None:  # two commands, so that `boom` is a sub-command name
        pass

    return app


def test_cli_prints_uqserve_errors_as_one_line() -> None:
    from uqserve.volumes import OutputError

    err = OutputError("/x/scan: results exist already; pass `overwrite=True`")
    res = CliRunner().invoke(_app_with(err), ["boom"])  # type: ignore[arg-type]
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: /x/scan: results exist already; pass --overwrite"


def test_cli_shows_bugs_with_their_traceback() -> None:
    res = CliRunner().invoke(_app_with(KeyError("member_fg")), ["boom"])  # type: ignore[arg-type]
    assert res.exit_code == 70
    lines = res.stderr.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "KeyError: 'member_fg'" in res.stderr
    assert "this is a bug in uqserve" in lines[-1] and "report it" in lines[-1]


def test_cli_plain_value_error_is_a_bug_not_a_user_error() -> None:
    # A ValueError that is not a UsageError comes from a bug (a shape mismatch, ...).
    res = CliRunner().invoke(_app_with(ValueError("operands could not be broadcast")), ["boom"])  # type: ignore[arg-type]
    assert res.exit_code == 70 and "Traceback" in res.stderr


def test_sidecar_unwritable_spool_names_the_spool(tmp_path: Path, tiny_bundle: Path) -> None:
    import socket

    from uqserve.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # A port in use: were the spool created after all, start() fails instead of serving forever.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(
            app,
            ["sidecar", "--spool", str(blocker / "spool"), "--bundle", str(tiny_bundle),
             "--listen", f"127.0.0.1:{port}", "--allow-any"],
        )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "spool" in res.stderr and "writable folder with --spool" in res.stderr, res.stderr
    assert "cannot listen" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
