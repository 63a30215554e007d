"""Integration tests against the real tritonserver (nvidia-pytriton wheel), started by the tests."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from tests._triton import TRITON_MARKS
from tests.conftest import blob_volume, write_nifti
from uqserve.bundle import BUNDLES_DIR, DEFAULT_BUNDLE, Bundle, load_bundle
from uqserve.prediction import predict, predict_volume
from uqserve.runtime.base import Batch, RuntimeServiceError
from uqserve.runtime.embedded import EmbeddedRuntime
from uqserve.runtime.triton import (
    TritonMismatchError,
    TritonNotReadyError,
    TritonRuntime,
    TritonUnavailableError,
    parse_server,
)
from uqserve.serving import ServerError, TritonServer, write_repository
from uqserve.volumes import read_volume

pytestmark = TRITON_MARKS

MAPS = ("prob", "tu", "au", "eu", "au_sample", "au_latent")
UQSERVE = [str(Path(sys.executable).parent / "uqserve")]
# Bounds that only a hang breaks: the unbounded behaviour takes minutes, and a
# loaded 2-core machine must not fail these tests by being slow.
LOADED_MACHINE_S = 120


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_softmax_bundle: Path
) -> Iterator[TritonServer]:
    """One tritonserver for the session, serving both tiny bundles (python flavour)."""
    repo = write_repository(
        [tiny_bundle, tiny_softmax_bundle], tmp_path_factory.mktemp("serving") / "repo", instances=1
    )
    with TritonServer(repo) as srv:
        yield srv


@pytest.fixture
def own_server(tmp_path: Path, tiny_bundle: Path) -> Iterator[TritonServer]:
    """A server of the test's own, for killing."""
    repo = write_repository(tiny_bundle, tmp_path / "own-repo", instances=1)
    srv = TritonServer(repo)
    srv.start()
    yield srv
    srv.stop()


def random_batch(
    rng: np.random.Generator, b: int = 3, h: int = 32, w: int = 40, z0: int = 0
) -> Batch:
    return Batch(
        image=rng.normal(size=(b, 1, h, w)).astype(np.float32),
        seed=np.full(b, 11, np.int64),
        offset=np.stack([np.arange(z0, z0 + b), np.full(b, 8), np.zeros(b, int)], axis=1).astype(
            np.int64
        ),
        valid=np.tile([h - 5, w - 2], (b, 1)).astype(np.int64),
    )


def sessions(bundle: Bundle) -> list[ort.InferenceSession]:
    return [
        ort.InferenceSession(str(bundle.member_path(m)), providers=["CPUExecutionProvider"])
        for m in range(bundle.manifest.num_members)
    ]


@pytest.mark.parametrize("which", ["tiny_bundle", "tiny_softmax_bundle"])
@pytest.mark.parametrize("shared_memory", [False, True])
def test_member_outputs_equal_onnxruntime(
    server: TritonServer, request: pytest.FixtureRequest, which: str, shared_memory: bool
) -> None:
    bundle = load_bundle(request.getfixturevalue(which))
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, z0=3 * i) for i in range(5)]
    refs = sessions(bundle)
    with TritonRuntime(bundle, [server.grpc_url], shared_memory=shared_memory) as rt:
        for want_samples in (False, True):
            got = list(rt.infer_many(batches, want_samples=want_samples))
            assert len(got) == len(batches)
            for batch, outs in zip(batches, got, strict=True):
                assert len(outs) == bundle.manifest.num_members
                for sess, out in zip(refs, outs, strict=True):
                    mean, ent, counts, labels = sess.run(None, batch.feeds())
                    assert out.mean.dtype == np.float32 and out.mean.shape == mean.shape
                    assert np.abs(out.mean - mean).max() <= 1e-5
                    assert np.abs(out.sample_entropy - ent).max() <= 1e-5
                    assert np.array_equal(out.sample_counts, counts)
                    if want_samples:
                        assert out.sample_labels is not None and out.sample_labels.dtype == np.uint8
                        assert np.array_equal(out.sample_labels, labels)
                    else:
                        assert out.sample_labels is None


def test_models_return_only_requested_outputs(server: TritonServer, tiny_bundle: Path) -> None:
    client = grpcclient.InferenceServerClient(parse_server(server.grpc_url)[1])
    batch = random_batch(np.random.default_rng(1), b=2)
    inputs = []
    for name, arr in batch.feeds().items():
        arr = arr.reshape(2, 1) if name == "seed" else arr
        inp = grpcclient.InferInput(
            name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64"
        )
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    res = client.infer(
        "tiny-ssn_member_0", inputs, outputs=[grpcclient.InferRequestedOutput("sample_counts")]
    )
    assert [o.name for o in res.get_response().outputs] == ["sample_counts"]
    cfg = client.get_model_config("tiny-ssn_nosamples").config
    assert not any(o.name.startswith("sample_labels") for o in cfg.output)
    client.close()


@pytest.mark.parametrize("shared_memory", [False, True])
def test_predict_through_triton_equals_embedded(
    server: TritonServer, tiny_bundle: Path, scan: Path, shared_memory: bool
) -> None:
    bundle = load_bundle(tiny_bundle)
    volume = read_volume(scan)
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=2, want_samples=True)
    with TritonRuntime(bundle, [server.grpc_url], shared_memory=shared_memory) as rt:
        got = predict_volume(volume, runtime=rt, batch_size=2, want_samples=True)
    for name in MAPS:
        diff = np.abs(getattr(got, name) - getattr(want, name)).max()
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
    assert np.array_equal(got.seg, want.seg)
    assert np.array_equal(got.sample_counts, want.sample_counts)
    assert got.sample_labels is not None and want.sample_labels is not None
    assert np.array_equal(got.sample_labels, want.sample_labels)


def test_four_concurrent_clients_get_their_own_results(
    server: TritonServer, tiny_softmax_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_softmax_bundle)
    volumes = [
        read_volume(write_nifti(tmp_path / f"scan{i}.nii.gz", blob_volume((36, 40, 6), seed=i)))
        for i in range(4)
    ]
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = [predict_volume(v, runtime=emb, batch_size=2) for v in volumes]
    got: dict[int, object] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with TritonRuntime(bundle, [server.grpc_url], max_in_flight=2) as rt:
                got[i] = predict_volume(volumes[i], runtime=rt, batch_size=2)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(4):
        for name in MAPS:
            assert np.abs(getattr(got[i], name) - getattr(want[i], name)).max() <= 1e-5, (i, name)
    # Different scans really gave different answers.
    assert not np.array_equal(want[0].prob, want[1].prob)


def test_server_killed_mid_scan_gives_clear_error_and_no_output(
    own_server: TritonServer, tiny_bundle: Path, tmp_path: Path
) -> None:
    scan = write_nifti(tmp_path / "long.nii.gz", blob_volume((32, 32, 40)))
    out = tmp_path / "out"
    killed = threading.Event()

    def progress(_name: str, done: int, _total: int) -> None:
        if done >= 4 and not killed.is_set():
            own_server.kill()
            killed.set()

    with TritonRuntime(
        load_bundle(tiny_bundle), [own_server.grpc_url], retries=2, backoff_s=0.05
    ) as rt:
        t0 = time.monotonic()
        with pytest.raises(TritonUnavailableError, match=re.escape(own_server.grpc_url)) as info:
            predict([scan], out, runtime=rt, batch_size=2, progress=progress)
        assert time.monotonic() - t0 < LOADED_MACHINE_S  # not hung on the dead server
    assert killed.is_set()
    assert "\n" not in str(info.value)
    assert not (out / "long").exists()
    leftovers = list(out.rglob("*")) if out.exists() else []
    assert leftovers == [], leftovers


def test_failover_to_the_next_server(
    server: TritonServer, own_server: TritonServer, tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = load_bundle(tiny_bundle)
    volume = read_volume(write_nifti(tmp_path / "v.nii.gz", blob_volume((32, 32, 24), seed=3)))
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=2)
    killed = threading.Event()

    def progress(_name: str, done: int, _total: int) -> None:
        if done >= 4 and not killed.is_set():
            own_server.kill()
            killed.set()

    with TritonRuntime(bundle, [own_server.grpc_url, server.grpc_url], backoff_s=0.05) as rt:
        got = predict_volume(volume, runtime=rt, batch_size=2, progress=progress)
    assert killed.is_set()
    for name in MAPS:
        assert np.abs(getattr(got, name) - getattr(want, name)).max() <= 1e-5, name


def test_unusable_servers_give_clear_errors(
    server: TritonServer, tiny_bundle: Path, make_bundle: object
) -> None:
    bundle = load_bundle(tiny_bundle)
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = f"grpc://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(
        TritonUnavailableError, match=rf"{re.escape(dead)}: server unreachable.*uqserve serve"
    ):
        TritonRuntime(bundle, [dead], timeout_s=5)
    # Same name, other weights: checksums differ.
    other = load_bundle(make_bundle("tiny-ssn", seed=5))  # type: ignore[operator]
    with pytest.raises(TritonMismatchError, match="member checksums differ"):
        TritonRuntime(other, [server.grpc_url])
    # A bundle the server does not serve.
    absent = load_bundle(make_bundle("absent"))  # type: ignore[operator]
    with pytest.raises(TritonNotReadyError, match=r"model 'absent' is not ready.*ready: tiny-s"):
        TritonRuntime(absent, [server.grpc_url])
    with pytest.raises(ValueError, match="not gRPC"):
        TritonRuntime(bundle, ["http://127.0.0.1:8000"])
    # One dead server among live ones is skipped.
    with TritonRuntime(bundle, [dead, server.grpc_url]) as rt:
        outs = rt.infer(random_batch(np.random.default_rng(2)))
        assert len(outs) == 2
    assert issubclass(TritonUnavailableError, RuntimeServiceError)


def test_cli_predict_with_server(
    server: TritonServer, tiny_bundle: Path, scan: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from uqserve.cli import app

    runner = CliRunner()
    args = ["predict", str(scan), "--bundle", str(tiny_bundle), "--quiet"]
    r1 = runner.invoke(app, [*args, "-o", str(tmp_path / "triton"), "--server", server.grpc_url])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, [*args, "-o", str(tmp_path / "embedded"), "--device", "cpu"])
    assert r2.exit_code == 0, r2.output
    import nibabel as nib

    for name in ("seg", "tu", "eu"):
        a = np.asarray(nib.load(str(tmp_path / "triton" / "scan" / f"{name}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "embedded" / "scan" / f"{name}.nii.gz")).dataobj)
        assert np.abs(a.astype(np.float64) - b).max() <= 1e-5, name


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    """Read the child's stdout until ``marker`` shows up or time runs out.

    Reads the raw descriptor: ``readline`` on the text wrapper would pull every
    line already in the pipe into its own buffer, where ``select`` cannot see
    them, and the wait would run out with ``marker`` sitting unread.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout_s
    while marker.encode() not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


def _serve_until_ready(bundle: Path) -> tuple[subprocess.Popen[str], str]:
    """``uqserve serve`` on free ports, and its output up to the "ready" line."""
    proc = subprocess.Popen(
        [*UQSERVE, "serve", "--bundle", str(bundle), "--instances", "1",
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    text = _read_until(proc, "ready", 90)
    if "ready" not in text:
        proc.kill()
        proc.wait()
        raise AssertionError(text)
    return proc, text


def test_cli_serve_starts_prints_endpoints_and_stops_on_sigterm(tiny_bundle: Path) -> None:
    proc, text = _serve_until_ready(tiny_bundle)
    try:
        url = re.search(r"gRPC\s+(grpc://\S+)", text)
        assert url, text
        with TritonRuntime(load_bundle(tiny_bundle), [url.group(1)]) as rt:
            assert len(rt.infer(random_batch(np.random.default_rng(3)))) == 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> set[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids.update(int(c) for c in (task / "children").read_text().split())
    return kids


def _process_group(pgid: int) -> set[int]:
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            members.add(int(stat.parent.name))
    return members


def _wait_all_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Wait (pidfd, no polling) until every process in ``pids`` has exited; the survivors."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    try:
        while fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], deadline - time.monotonic())
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return set(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def test_cli_serve_killed_with_sigkill_takes_tritonserver_and_stubs_along(
    tiny_bundle: Path,
) -> None:
    proc, _ = _serve_until_ready(tiny_bundle)
    try:
        kids = _children(proc.pid)  # tritonserver and its watchdog
        (server_pid,) = [k for k in kids if _is_tritonserver(k)]
        group = _process_group(server_pid)  # tritonserver + python backend stubs
        assert len(group) >= 3, group  # the server and one stub per member at least
        workdir = Path(os.readlink(f"/proc/{server_pid}/cwd"))
        assert workdir.name.startswith("uqserve-tritonserver-")
        proc.kill()
        proc.wait()
        survivors = _wait_all_gone(kids | group, 60)
        assert survivors == set(), f"still running after the launcher died: {survivors}"
        assert not workdir.exists()
        assert not list(Path("/dev/shm").glob(f"uqserve_{proc.pid}_*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_serve_signalled_while_starting_stops_the_server(
    tiny_bundle: Path, sig: int, code: int
) -> None:
    env = {**os.environ, "UQSERVE_STOP_AT": "server-started"}
    proc = subprocess.Popen(
        [*UQSERVE, "serve", "--bundle", str(tiny_bundle), "--instances", "1",
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # tritonserver launched, not ready
        assert os.WIFSTOPPED(status)
        (server_pid,) = [k for k in _children(proc.pid) if _is_tritonserver(k)]
        workdir = Path(os.readlink(f"/proc/{server_pid}/cwd"))
        os.kill(proc.pid, sig)  # pending until it runs again
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == code, out
        assert "Traceback" not in out
        assert _wait_all_gone({server_pid}, 30) == set()
        assert not workdir.exists()  # an interrupted start keeps no log folder
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _is_tritonserver(pid: int) -> bool:
    return Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"


def test_stalled_server_fails_within_timeout_and_deadline(
    own_server: TritonServer, tiny_bundle: Path, tmp_path: Path
) -> None:
    """SIGSTOP mid-scan: the client gives up after one timeout plus a health check,
    or at the deadline, instead of 60 s x retries; the CLI's --timeout reaches it."""
    scan = write_nifti(tmp_path / "long.nii.gz", blob_volume((32, 32, 40)))
    assert own_server.pid is not None
    stopped = threading.Event()

    def stall(_name: str, done: int, _total: int) -> None:
        if done >= 2 and not stopped.is_set():
            os.kill(own_server.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            stopped.set()

    bundle = load_bundle(tiny_bundle)
    try:
        with TritonRuntime(bundle, [own_server.grpc_url], timeout_s=2, retries=5) as rt:
            t0 = time.monotonic()
            with pytest.raises(TritonUnavailableError, match="health check"):
                predict([scan], tmp_path / "a", runtime=rt, batch_size=2, progress=stall)
            assert time.monotonic() - t0 < LOADED_MACHINE_S
        assert stopped.is_set() and not (tmp_path / "a").exists()
        # The deadline bounds a scan however many retries are allowed.
        os.kill(own_server.pid, signal.SIGCONT)
        stopped.clear()
        with TritonRuntime(
            bundle, [own_server.grpc_url], timeout_s=30, deadline_s=3, retries=50
        ) as rt:
            t0 = time.monotonic()
            with pytest.raises(TritonUnavailableError, match="within the deadline of 3 s"):
                predict([scan], tmp_path / "b", runtime=rt, batch_size=2, progress=stall)
            assert time.monotonic() - t0 < LOADED_MACHINE_S  # 50 retries x 30 s without it
        # The CLI: a stalled server at start-up is one line and exit 1 (--timeout 2).
        r = subprocess.run(
            [*UQSERVE, "predict", str(scan), "-o", str(tmp_path / "c"), "-b", str(tiny_bundle),
             "--server", own_server.grpc_url, "--timeout", "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 1 and own_server.grpc_url in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        os.kill(own_server.pid, signal.SIGCONT)


def test_cli_serve_port_taken_and_missing_extra(tiny_bundle: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [*UQSERVE, "serve", "--bundle", str(tiny_bundle), "--grpc-port", str(port),
             "--http-port", "0", "--metrics-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in r.stderr and "--grpc-port" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # Without the server extra: hide the nvidia-pytriton package from the import system.
    code = "import sys; sys.modules['pytriton'] = None; from uqserve.cli import app; app(['serve'])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Triton server is not installed" in r.stderr and "uqserve[server]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


COMMITTED_PYTHON_REPO = Path(__file__).resolve().parents[1] / "model_repository" / "python"


@pytest.mark.skipif(
    not (BUNDLES_DIR / DEFAULT_BUNDLE / "manifest.json").is_file()
    or not COMMITTED_PYTHON_REPO.is_dir(),
    reason="the shipped default bundle or model_repository/python is missing",
)
def test_committed_repository_serves_the_default_bundle(tmp_path: Path) -> None:
    """The committed python-flavour repository loads in the real server and predicts
    exactly what the embedded runtime predicts with the shipped bundle."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    volume = read_volume(write_nifti(tmp_path / "s.nii.gz", blob_volume((48, 40, 4), seed=7)))
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=2)
    with TritonServer(COMMITTED_PYTHON_REPO) as srv, TritonRuntime(bundle, [srv.grpc_url]) as rt:
        got = predict_volume(volume, runtime=rt, batch_size=2)
    for name in MAPS:
        diff = np.abs(getattr(got, name) - getattr(want, name)).max()
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
    assert np.array_equal(got.seg, want.seg)


# --------------------------------------------------------------------------- reduce on the server
# ``--reduce server``: the client's results stay within 1e-5 of the embedded runtime
# while only the ensemble's sums travel.


@pytest.fixture(scope="module")
def reduce_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path, tiny_softmax_bundle: Path
) -> Iterator[TritonServer]:
    """A tritonserver serving both tiny bundles with the reduction step (python flavour)."""
    repo = write_repository(
        [tiny_bundle, tiny_softmax_bundle],
        tmp_path_factory.mktemp("reduce") / "repo",
        instances=1,
        reduce="server",
    )
    with TritonServer(repo) as srv:
        yield srv


def _inferences(server: TritonServer, model: str) -> int:
    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    try:
        stats = client.get_inference_statistics(model_name=model)
        return int(stats.model_stats[0].inference_count)
    finally:
        client.close()


@pytest.mark.parametrize("which", ["tiny_bundle", "tiny_softmax_bundle"])
def test_reduced_results_equal_embedded_within_1e5(
    reduce_server: TritonServer, scan: Path, which: str, request: pytest.FixtureRequest
) -> None:
    bundle = load_bundle(request.getfixturevalue(which))
    volume = read_volume(scan)
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=2)
    with TritonRuntime(
        bundle, [reduce_server.grpc_url], shared_memory=which == "tiny_bundle"
    ) as rt:
        assert rt.reduces
        got = predict_volume(volume, runtime=rt, batch_size=2)
    for name in MAPS:
        diff = float(np.abs(getattr(got, name) - getattr(want, name)).max())
        assert diff <= 1e-5, f"{name}: max abs difference {diff}"
    assert np.array_equal(got.seg, want.seg)
    assert np.array_equal(got.sample_counts, want.sample_counts)
    if bundle.manifest.num_samples == 1:
        assert not got.au_latent.any()  # exactly 0, as embedded
    # the server really ran the reduction ensemble
    assert _inferences(reduce_server, f"{bundle.manifest.name}_reduced") > 0
    for key in ("tu", "au", "eu"):
        assert got.report["scores"][key] == pytest.approx(want.report["scores"][key], abs=1e-5)
    assert got.report["volumes"] == want.report["volumes"]


def test_samples_and_client_mode_still_use_the_members(
    reduce_server: TritonServer, tiny_bundle: Path, scan: Path
) -> None:
    """Sample labels need every member; reduce='client' ignores the reduction: both are exact."""
    bundle = load_bundle(tiny_bundle)
    volume = read_volume(scan)
    with EmbeddedRuntime(bundle, device="cpu") as emb:
        want = predict_volume(volume, runtime=emb, batch_size=3, want_samples=True)
    with TritonRuntime(bundle, [reduce_server.grpc_url], reduce="client") as rt:
        assert not rt.reduces
        plain = predict_volume(volume, runtime=rt, batch_size=3)
    with TritonRuntime(bundle, [reduce_server.grpc_url]) as rt:
        with_samples = predict_volume(volume, runtime=rt, batch_size=3, want_samples=True)
    for got in (plain, with_samples):
        for name in MAPS:
            assert np.abs(getattr(got, name) - getattr(want, name)).max() <= 1e-5, name
    assert with_samples.sample_labels is not None and want.sample_labels is not None
    assert np.array_equal(with_samples.sample_labels, want.sample_labels)


def _serve_stopped_at_start(bundle: Path, temp: Path) -> subprocess.Popen[str]:
    """``uqserve serve`` with ``TMPDIR=temp``, stopped once tritonserver is launched."""
    env = {**os.environ, "UQSERVE_STOP_AT": "server-started", "TMPDIR": str(temp)}
    proc = subprocess.Popen(
        [*UQSERVE, "serve", "--bundle", str(bundle), "--instances", "1",
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    return proc


def test_serve_killed_with_its_watchdog_leaves_folders_the_next_start_removes(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """kill -9 of serve, its watchdog and tritonserver: the next start cleans up after them."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    first = _serve_stopped_at_start(tiny_bundle, temp)
    kids = _children(first.pid)  # tritonserver and the watchdog
    (server_pid,) = [k for k in kids if _is_tritonserver(k)]
    group = _process_group(server_pid)
    for pid in {first.pid} | kids | group:
        os.kill(pid, signal.SIGKILL)
    first.wait()
    assert _wait_all_gone(kids | group, 30) == set()
    left = sorted(p.name.split("-")[1] for p in temp.glob("uqserve-*"))
    assert left == ["serve", "tritonserver"], left  # the repository copy, the work folder
    second = _serve_stopped_at_start(tiny_bundle, temp)
    try:
        ours = list(temp.glob("uqserve-*"))
        assert len(ours) == 2 and all(f".{second.pid}." in p.name for p in ours)
        os.kill(second.pid, signal.SIGTERM)
        os.kill(second.pid, signal.SIGCONT)
        second.communicate(timeout=60)
        assert second.returncode == 143 and list(temp.glob("uqserve-*")) == []
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()


def test_a_server_that_dies_with_its_log_elsewhere_leaves_no_folder(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    repo = write_repository(tiny_bundle, tmp_path / "repo", instances=1)
    for config in repo.rglob("config.pbtxt"):
        config.write_text("this is { not a model config")
    server = TritonServer(repo, log_path=tmp_path / "server.log")
    with pytest.raises(ServerError):
        server.start()
    server.stop()
    assert (tmp_path / "server.log").stat().st_size > 0
    assert list(temp.glob("uqserve-*")) == []  # no empty work folder
