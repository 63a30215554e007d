"""``uqserve repo`` and ``uqserve serve``: Triton model repositories and a local server."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from uqserve._fs import make_owned_temp_dir, remove_dead_owners_temp
from uqserve.cli._app import app
from uqserve.cli._common import console, fail

ReduceOption = Annotated[
    str,
    typer.Option(
        help="client: every member's outputs go to the client; server: the ensemble also "
        "sums them on the server (K + 2 numbers per voxel cross the network instead of "
        "M x (K + 1)); clients use it by themselves.",
    ),
]


@app.command("repo")
def repo_command(
    bundles: Annotated[
        list[str],
        typer.Argument(help="Shipped bundle names or bundle folders.", show_default=False),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Repository folder to write.")],
    flavour: Annotated[
        str,
        typer.Option(
            help="python: CPU, for the pip-installed server (`uqserve serve`); "
            "onnxruntime: GPU, for the NGC tritonserver image."
        ),
    ] = "python",
    link: Annotated[
        bool,
        typer.Option("--link", help="Symlink the member ONNX files instead of copying them."),
    ] = False,
    instances: Annotated[
        int | None,
        typer.Option(
            help="Instances per member (default: 2 python, 1 per GPU onnxruntime).", min=1
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="onnxruntime threads per instance (default: cores / instances).", min=1),
    ] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1)] = 32,
    reduce: ReduceOption = "client",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")
    ] = False,
) -> None:
    """Write a Triton model repository: one model per member plus the bundle's ensemble."""
    from uqserve.serving import write_repository

    path = write_repository(
        bundles,
        out,
        flavour=flavour,
        member_files="symlink" if link else "copy",
        instances=instances,
        threads=threads,
        max_batch_size=max_batch_size,
        reduce=reduce,
        overwrite=overwrite,
    )
    console.print(
        f"wrote {flavour} repository for {', '.join(bundles)} to {path}/",
        highlight=False,
        soft_wrap=True,
    )


SERVE_TEMP_PREFIX = "uqserve-serve-"


@contextlib.contextmanager
def _owned_temp_dir(prefix: str) -> Iterator[Path]:
    """A temp folder named after this process (see ``make_owned_temp_dir``), removed after."""
    tmp = make_owned_temp_dir(prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@app.command("serve")
def serve_command(
    bundle: Annotated[
        list[str] | None,
        typer.Option(
            "--bundle",
            "-b",
            help="Bundle to serve (shipped name or folder); repeat for several.",
            show_default="softmax-ensemble",
        ),
    ] = None,
    repo: Annotated[
        Path | None,
        typer.Option("--repo", help="Serve this model repository instead (python flavour)."),
    ] = None,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option("--http-port", help="0 = any free port.", min=0)] = 8000,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="0 = any free port.", min=0)] = 8001,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", help="0 = any free port.", min=0)
    ] = 8002,
    instances: Annotated[
        int | None, typer.Option(help="Instances per member (default 2).", min=1)
    ] = None,
    log: Annotated[
        Path | None, typer.Option("--log", help="Write the server log here (default: a temp file).")
    ] = None,
    reduce: ReduceOption = "client",
) -> None:
    """Run the real tritonserver (from the `server` extra) until Ctrl-C or SIGTERM."""
    from uqserve.bundle import load_bundle
    from uqserve.serving import (
        TritonServer,
        find_server_tree,
        validate_repository,
        write_repository,
    )

    if repo is not None and bundle:
        fail("pass either --bundle or --repo, not both")
    # A serve killed with SIGKILL left its repository copy: removed once its owner is gone.
    remove_dead_owners_temp(SERVE_TEMP_PREFIX)
    find_server_tree()

    with _owned_temp_dir(SERVE_TEMP_PREFIX) as tmp:
        if repo is not None:
            models = validate_repository(repo)
            repo_dir = repo
        else:
            loaded = [load_bundle(b) for b in bundle] if bundle else [load_bundle(None)]
            repo_dir = write_repository(
                loaded, Path(tmp) / "repository", "python", instances=instances, reduce=reduce
            )
            models = [b.manifest.name for b in loaded]
        server = TritonServer(
            repo_dir,
            address=address,
            http_port=http_port or None,
            grpc_port=grpc_port or None,
            metrics_port=metrics_port or None,
            log_path=log,
        )

        stop = threading.Event()
        received: list[int] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signum)
            stop.set()

        previous: dict[int, Any] = {}
        try:
            # A signal while starting takes the app's handlers: start() stops what it began
            # and the command exits 143 (SIGTERM) or 130 (Ctrl-C). Once ready, a signal
            # stops the server and serve exits 0.
            server.start()
            previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            console.print(f"serving {', '.join(models)}", highlight=False, soft_wrap=True)
            console.print(f"  gRPC     {server.grpc_url}", highlight=False, soft_wrap=True)
            console.print(f"  HTTP     {server.http_url}", highlight=False, soft_wrap=True)
            console.print(f"  metrics  {server.metrics_url}", highlight=False, soft_wrap=True)
            console.print(
                f"predict with: uqserve predict SCAN --server {server.grpc_url}"
                + (f" --bundle {bundle[0]}" if bundle else ""),
                highlight=False,
                soft_wrap=True,
            )
            console.print("ready; Ctrl-C stops the server", highlight=False, soft_wrap=True)
            while not stop.wait(0.5):
                if not server.running():
                    log_path = server.log_path
                    code = server.stop()
                    fail(f"tritonserver stopped unexpectedly (exit code {code}); log: {log_path}")
        finally:
            server.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        console.print("stopped", highlight=False, soft_wrap=True)
