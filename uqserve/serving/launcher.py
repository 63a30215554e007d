"""Start and stop the real tritonserver that ships in the ``nvidia-pytriton`` wheel.

The wheel (the ``server`` extra) carries a CPU build of Triton with the python
backend. It is not runnable in place: the server looks for backends next to
itself and the python backend needs the stub built for the running Python.
``TritonServer`` therefore copies the wheel's ``pytriton/tritonserver`` tree
to a work folder, puts ``python_backend_stubs/3.X/triton_python_backend_stub``
into ``backends/python/``, and runs ``bin/tritonserver`` with
``LD_LIBRARY_PATH`` = the wheel's ``nvidia_pytriton.libs`` + this interpreter's
own ``lib`` folder (so the stub embeds the same libpython as the client) and
``PATH`` = this venv's ``bin`` (so the stub finds this Python's packages).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from uqserve import _failpoints
from uqserve._fs import make_owned_temp_dir, remove_dead_owners_temp
from uqserve.errors import ServiceError

WORKDIR_PREFIX = "uqserve-tritonserver-"
LOG_NAME = "tritonserver.log"

# The watchdog: a tiny process that outlives a launcher killed with SIGKILL. It waits
# for EOF on its stdin (the launcher holds the only write end, so EOF means the launcher
# is gone, however it died), then kills the server's process group (tritonserver and
# its python backend stubs) and removes the work folder and shared-memory regions.
_WATCHDOG = """
import glob, os, shutil, signal, sys
pgid, workdir, shm_prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
signal.signal(signal.SIGINT, signal.SIG_IGN)
while sys.stdin.buffer.read(4096):
    pass
try:
    os.killpg(pgid, signal.SIGKILL)
except OSError:
    pass
shutil.rmtree(workdir, ignore_errors=True)
for region in glob.glob("/dev/shm/" + shm_prefix + "*"):
    try:
        os.unlink(region)
    except OSError:
        pass
"""


class ServerError(ServiceError):
    """The server cannot start or stopped: missing extra, taken port, bad repository."""


def find_server_tree() -> Path:
    """Folder ``pytriton/tritonserver`` of the installed wheel, or ``ServerError``."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "the Triton server is not installed: install the server extra "
            "(pip install 'uqserve[server]'), or run tritonserver yourself (see the Dockerfile)"
        )
    tree = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (tree / "bin" / "tritonserver").is_file():
        raise ServerError(f"{tree}: no bin/tritonserver in the nvidia-pytriton wheel; reinstall it")
    return tree


def port_is_free(address: str, port: int) -> bool:
    """True when ``address:port`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def free_port(address: str = "127.0.0.1") -> int:
    """A port the OS considers free on ``address`` (racy by nature, good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class TritonServer:
    """The real tritonserver serving ``repo``; a context manager.

    ``http_port``, ``grpc_port``, ``metrics_port``: ``None`` picks a free port.
    ``start()`` returns once ``/v2/health/ready`` answers 200 (all models
    loaded) or raises ``ServerError`` with the reason and the log's tail.
    ``stop()`` sends SIGTERM, waits, then kills. The server's log goes to
    ``log_path`` (in the work folder unless given). The server dies with this
    process however it ends: a watchdog process kills the server's process group
    and removes its work folder when this process is gone, even after SIGKILL.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        *,
        address: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout_s: float = 120.0,
        log_verbose: int = 0,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServerError(
                f"{repo}: no such model repository folder; write one with `uqserve repo`"
            )
        self.address = address
        ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        for kind, port in ports.items():
            if port is not None and not (0 < port < 65536):
                raise ServerError(f"`{kind}_port={port}` is not a port number (1-65535)")
        used = [p for p in ports.values() if p is not None]
        if len(set(used)) != len(used):
            raise ServerError(f"the HTTP, gRPC and metrics ports must differ, got {used}")
        self._requested = ports
        self.ports: dict[str, int] = {}
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self._user_log = Path(log_path) if log_path is not None else None
        self._log_path: Path | None = None
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._keep_log = False
        self._killed = False
        self._shm_prefix = f"uqserve_{os.getpid()}_{id(self):x}_"

    # -- endpoints
    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.address}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.ports['metrics']}/metrics"

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise ServerError("the server has not been started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- life cycle
    def start(self) -> TritonServer:
        """Start and wait until ready; retried with new ports if a picked port got taken."""
        if self.running():
            return self
        auto_ports = any(p is None for p in self._requested.values())
        for attempt in range(3):
            try:
                return self._start()
            except ServerError as exc:
                # Another process may grab a free port between our check and the server's bind.
                text = str(exc).lower()
                if not (auto_ports and attempt < 2 and ("in use" in text or "bind" in text)):
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> TritonServer:
        tree = find_server_tree()
        self._pick_ports()
        server_dir = self._stage_server(tree)
        self._log_path = self._user_log or server_dir.parent / LOG_NAME
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                self._command(server_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(tree),
                cwd=self._workdir,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it
            )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self._process.pid), str(self._workdir),
             self._shm_prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            _failpoints.reached("server-started")
            self._wait_ready()
        except BaseException as exc:
            # A failed start keeps its log for the user; an interrupted one (Ctrl-C,
            # SIGTERM) leaves nothing behind.
            self._keep_log = isinstance(exc, Exception)
            self.stop()
            raise
        return self

    def _pick_ports(self) -> None:
        """``self.ports``: the requested ports (checked free), free ones for the rest."""
        for kind, port in self._requested.items():
            if port is not None and not port_is_free(self.address, port):
                raise ServerError(
                    f"port {port} on {self.address} is taken (wanted for {kind}); "
                    f"stop what uses it or pass another `{kind}_port`"
                )
        taken = {p for p in self._requested.values() if p is not None}
        for kind, port in self._requested.items():
            if port is None:
                port = free_port(self.address)
                while port in taken:
                    port = free_port(self.address)
                taken.add(port)
            self.ports[kind] = port

    def _stage_server(self, tree: Path) -> Path:
        """A copy of the server ``tree`` with this Python's backend stub, in a new ``_workdir``."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = tree / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(
                f"nvidia-pytriton has no python backend stub for Python {version}; "
                "use Python 3.8-3.13 or the NGC image"
            )
        # Work folders of launchers that died with their watchdog (kill -9 of both).
        remove_dead_owners_temp(WORKDIR_PREFIX, log_name=LOG_NAME)
        self._workdir = make_owned_temp_dir(WORKDIR_PREFIX)
        self._keep_log = self._killed = False
        server_dir = self._workdir / "tritonserver"
        shutil.copytree(tree, server_dir, symlinks=True)
        shutil.copy2(stub, server_dir / "backends" / "python" / stub.name)
        return server_dir

    @staticmethod
    def _environment(tree: Path) -> dict[str, str]:
        """The server's environment: its bundled libraries, libpython and this Python first."""
        env = dict(os.environ)
        libs = [str(tree.parent.parent / "nvidia_pytriton.libs")]
        pylib = sysconfig.get_config_var("LIBDIR")
        if pylib:
            libs.append(str(pylib))
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _command(self, server_dir: Path) -> list[str]:
        """The ``tritonserver`` command line: loopback addresses, our ports, strict readiness."""
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={server_dir / 'backends'}",
            f"--cache-directory={server_dir / 'caches'}",
            f"--http-address={self.address}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            # Known prefix, so that stop() can remove the regions a killed server leaves.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def _wait_ready(self) -> None:
        url = f"{self.http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self._process.returncode} while starting: "
                    f"{self._log_reason()} (log: {self._log_path})"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(
            f"tritonserver not ready after {self.startup_timeout_s:.0f} s: "
            f"{self._log_reason()} (log: {self._log_path})"
        )

    def _log_reason(self) -> str:
        """The most telling line of the server log (first error, else the last line)."""
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except (OSError, ServerError):
            return "no log"
        for line in lines:
            if line.startswith("E") or "failed to load" in line or "error" in line.lower():
                # CUDA complaints are expected on CPU-only machines and say nothing.
                if "cuda" not in line.lower():
                    return line.strip()[:400]
        return lines[-1].strip()[:400] if lines else "empty log"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); return its exit code."""
        code = None
        proc = self._process
        if self._watchdog is not None:
            # We clean up ourselves (and may keep the log): the watchdog must not.
            self._watchdog.kill()
            self._watchdog.wait()
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()
            self._watchdog = None
        if proc is not None:
            if proc.poll() is not None and not self._killed:
                self._keep_log = True  # it died on its own: the log says why
            else:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            code = proc.returncode
            # python stubs are children of the server in its own session: stop stragglers.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._process = None
            for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                region.unlink(missing_ok=True)
        if self._workdir is not None:
            # Keep the log (and only the log) after a failed start, for the user to read.
            log_inside = self._user_log is None
            if self._keep_log and log_inside:
                shutil.rmtree(self._workdir / "tritonserver", ignore_errors=True)
            else:  # nothing to keep: the log (if any) was written elsewhere
                shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would; for failure tests."""
        if self._process is not None and self._process.poll() is None:
            self._killed = True
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
