"""``uqserve sidecar``: a DICOM node next to a PACS (Storage SCP in, SEG and maps out)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from uqserve.cli._app import app
from uqserve.cli._common import BundleOption, SeedOption, cli_message, fail

if TYPE_CHECKING:
    from uqserve.sidecar import Peer
    from uqserve.sidecar.dicomweb import WebPeer


@app.command("sidecar")
def sidecar_command(
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT the Storage SCP listens on.")
    ] = "0.0.0.0:11112",
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title.")] = "UQSERVE",
    allow: Annotated[
        str | None,
        typer.Option(
            "--allow",
            help="Comma-separated calling AE titles accepted (required, or --allow-any).",
            show_default=False,
        ),
    ] = None,
    allow_any: Annotated[
        bool,
        typer.Option("--allow-any", help="Accept every calling AE title (no --allow list)."),
    ] = False,
    server: Annotated[
        list[str] | None,
        typer.Option(
            "--server",
            help="Triton server URL (grpc://host:port); repeat for several. "
            "Default: run in-process.",
            show_default=False,
        ),
    ] = None,
    send_to: Annotated[
        str | None,
        typer.Option(
            "--send-to",
            help="AE@HOST:PORT that receives the results by C-STORE, or "
            "http(s)://HOST:PORT/dicom-web for STOW-RS (credentials: $UQSERVE_DICOMWEB_AUTH "
            "or --dicomweb-auth-file) (default: keep them in SPOOL/out).",
            show_default=False,
        ),
    ] = None,
    spool: Annotated[
        Path,
        typer.Option(
            "--spool", help="Durable spool folder (received series, state, dead letters)."
        ),
    ] = Path("uqserve-spool"),
    stable_seconds: Annotated[
        float,
        typer.Option(
            "--stable-seconds",
            help="A series is complete once no instance arrived for this long.",
            min=0,
        ),
    ] = 10.0,
    bundle: BundleOption = None,
    seed: SeedOption = None,
    device: Annotated[
        str, typer.Option(help="Embedded runtime device: auto, cpu or cuda.")
    ] = "auto",
    seg_type: Annotated[
        str, typer.Option("--seg-type", help="DICOM SEG type: binary or labelmap.")
    ] = "binary",
    fractional: Annotated[
        bool,
        typer.Option(
            "--fractional/--no-fractional", help="Also send a FRACTIONAL SEG of the probability."
        ),
    ] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Also send the SR report.")
    ] = True,
    max_attempts: Annotated[
        int,
        typer.Option("--max-attempts", help="Tries per series before it is marked failed.", min=1),
    ] = 5,
    retry_seconds: Annotated[
        float,
        typer.Option(
            "--retry-seconds", help="First retry delay; doubles per attempt (max 1 h).", min=0
        ),
    ] = 30.0,
    keep_seconds: Annotated[
        float,
        typer.Option(
            "--keep-seconds",
            help="Keep a finished series' images this long, so late images are merged "
            "with them and the series is processed whole again (0: do not keep).",
            min=0,
        ),
    ] = 900.0,
    max_associations: Annotated[
        int,
        typer.Option(
            "--max-associations", help="Associations served at once; more are rejected.", min=1
        ),
    ] = 32,
    acse_timeout: Annotated[
        float,
        typer.Option(
            "--acse-timeout",
            help="Seconds a peer may take to open (or release) an association; "
            "idle connections are closed after this.",
            min=0.1,
        ),
    ] = 10.0,
    dimse_timeout: Annotated[
        float,
        typer.Option(
            "--dimse-timeout", help="Seconds to wait for the next DIMSE message.", min=0.1
        ),
    ] = 30.0,
    network_timeout: Annotated[
        float,
        typer.Option(
            "--network-timeout", help="Close an association silent for this long.", min=0.1
        ),
    ] = 60.0,
    dicomweb_auth_file: Annotated[
        Path | None,
        typer.Option(
            "--dicomweb-auth-file",
            help="File holding 'Bearer <token>' or 'Basic <user>:<password>' for a DICOMweb "
            "--send-to (read again before each delivery; never pass secrets as options).",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            help="PEM certificate of this node: DICOM TLS on the listener and the sender "
            "(TLS 1.2 or newer; a plain association is then refused).",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key", help="PEM private key of --tls-cert (unencrypted).", show_default=False
        ),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca",
            help="PEM CA that signs the peers' certificates: senders must present one "
            "(mutual TLS) and the receiving peer is verified against it "
            "(default: the system's CAs).",
            show_default=False,
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="HOST:PORT serving /healthz, /readyz and /metrics (Prometheus) over HTTP "
            "(default: not served).",
            show_default=False,
        ),
    ] = None,
    log_format: Annotated[
        str,
        typer.Option("--log-format", help="text (human-readable) or json (one object a line)."),
    ] = "text",
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log every received instance.")
    ] = False,
) -> None:
    """Receive CT/MR series by DICOM, predict, send back DICOM SEG, uncertainty maps and a report.

    Runs until SIGTERM or Ctrl-C. Logs never contain patient identifiers.
    """
    from uqserve.errors import UsageError
    from uqserve.sidecar import Limits, OutputOptions, Sidecar, SidecarConfig
    from uqserve.sidecar.dicomweb import WebAuth, WebPeer
    from uqserve.sidecar.logfmt import configure_logging
    from uqserve.sidecar.sender import check_ae_title, parse_address
    from uqserve.sidecar.service import BundlePredictor
    from uqserve.sidecar.tls import TLSConfig

    configure_logging(log_format, verbose=verbose)
    # Everything that cannot work is refused here, before the port is opened:
    # options, bundle, device, model server, spool.
    host, port = parse_address(listen, default_port=11112)
    tls = TLSConfig.from_files(tls_cert, tls_key, tls_ca)
    metrics_at = parse_address(metrics, default_port=9102) if metrics else None
    peer = _peer(send_to) if send_to else None
    web_auth = WebAuth.load(dicomweb_auth_file) if isinstance(peer, WebPeer) else None
    if dicomweb_auth_file is not None and not isinstance(peer, WebPeer):
        raise UsageError("--dicomweb-auth-file needs a DICOMweb --send-to http(s)://...")
    allowed = tuple(
        check_ae_title(a, "--allow AE title") for a in (allow or "").split(",") if a.strip()
    )
    if not allowed and not allow_any:  # fail closed: an empty $ALLOW must not open the door
        fail(
            f"--allow {'is empty' if allow is not None else 'is missing'}: give the calling AE "
            "titles to accept (--allow PACS,MODALITY), or --allow-any to accept every caller"
        )
    config = SidecarConfig(
        spool=spool,
        ae_title=check_ae_title(ae_title, "--ae-title"),
        host=host,
        port=port,
        allow=allowed,
        allow_any=allow_any,
        send_to=peer,
        stable_seconds=stable_seconds,
        outputs=OutputOptions(seg_type=seg_type.lower(), fractional=fractional, report=report),
        max_attempts=max_attempts,
        retry_base_s=retry_seconds,
        keep_s=keep_seconds,
        limits=Limits(
            acse_s=acse_timeout,
            dimse_s=dimse_timeout,
            network_s=network_timeout,
            max_associations=max_associations,
        ),
        tls=tls,
        metrics=metrics_at,
        web_auth=web_auth,
    )
    servers = [s.removeprefix("grpc://") for s in server or []]
    predictor = BundlePredictor(bundle, servers, seed=seed, device=device)
    predictor.open()
    try:
        sidecar = Sidecar(config, predictor)  # creates the spool and writes a probe file
    except UsageError as exc:
        predictor.close()
        fail(cli_message(str(exc)).replace("as spool", "with --spool"))
    try:
        sidecar.start()
    except UsageError as exc:  # the --metrics port
        predictor.close()
        fail(cli_message(str(exc)).replace("metrics address", "--metrics"))
    except OSError as exc:
        predictor.close()
        fail(
            f"cannot listen on {listen} ({exc.strerror or exc}); "
            "choose a free port with --listen HOST:PORT"
        )

    def _stop(signum: int, frame: Any) -> None:
        sidecar.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if allow_any and not allowed:
        logging.getLogger("uqserve.sidecar").warning("--allow-any: every calling AE title may send")
    sidecar.wait()
    raise typer.Exit(0)


def _peer(text: str) -> Peer | WebPeer:
    """``--send-to``: a DICOMweb root (http/https) or a DICOM AE@HOST:PORT."""
    from uqserve.sidecar import Peer
    from uqserve.sidecar.dicomweb import WebPeer

    if text.strip().lower().startswith(("http://", "https://")):
        return WebPeer.parse(text)
    return Peer.parse(text)
