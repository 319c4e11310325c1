"""Starts a real `tritonserver` on the BLIP-2 model repository and waits until it is ready.

Uses the `tritonserver` on PATH (NGC container) or the one bundled in the `nvidia-pytriton` wheel, which
needs a Python backend stub for the running interpreter and library paths set up (done here, in a cache
directory, never in site-packages).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .options import default_cache_dir, env_var
from .watchdog import Endpoints, StubWatchdog, drain_and_stop, end_with_parent, kill_server, stub_processes

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parent


class LauncherError(RuntimeError):
    pass


class StartupInterruptedError(LauncherError):
    """A stop was requested while tritonserver was still starting; it has been stopped."""


# Triton's admin APIs: model load/unload and repository index, shared-memory registration, trace and log
# settings. Inference callers must not reach them; Triton cannot switch them off, only require a header.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_KEY_HEADER = "triton-admin-key"
# Same variable as docker/entrypoint.sh: the operator's key; unset means a random key, i.e. the APIs closed.
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"


def restricted_api_args(admin_key: str) -> list[str]:
    spec = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={admin_key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def _find_repository(env_name: str, candidates: tuple[Path, ...], ensemble: str) -> Path:
    env = os.environ.get(env_name)
    if env:
        return Path(env)
    for candidate in candidates:
        if (candidate / ensemble / "config.pbtxt").exists():
            return candidate
    raise LauncherError(f"no model repository with {ensemble!r} found; set {env_name}")


# Source checkout first (<root>/src/blip2_triton -> <root>/...), then the container image's copy.
def default_model_repository() -> Path:
    return _find_repository(
        "BLIP2_MODEL_REPOSITORY",
        (PACKAGE_ROOT.parent.parent / "model_repository", Path("/opt/blip2/model_repository")),
        "blip2",
    )


def default_t5_model_repository() -> Path:
    return _find_repository(
        "BLIP2_T5_MODEL_REPOSITORY",
        (PACKAGE_ROOT.parent.parent / "model_repository_t5", Path("/opt/blip2/model_repository_t5")),
        "blip2_t5",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_directory: Path | None
    env: dict[str, str]


def _bundled_install(cache_dir: Path) -> TritonInstall | None:
    # Only the wheel's files are used: importing pytriton would pull in its Python API's dependencies.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.exists():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise LauncherError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    # The backend directory must hold the stub of *this* interpreter; build it beside the wheel's files.
    backends = cache_dir / "triton-backends" / f"py{version}"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python").iterdir():
        if src.is_file():
            _copy_if_changed(src, python_dir / src.name)
    _copy_if_changed(stub, python_dir / "triton_python_backend_stub")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (sysconfig.get_config_var("LIBDIR"), str(libs), os.environ.get("LD_LIBRARY_PATH")) if p
        ),
        # The stub embeds libpython and finds the environment's site-packages from `python3` on PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return TritonInstall(binary, backends, env)


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    tmp = dst.with_suffix(dst.suffix + f".{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def find_tritonserver(cache_dir: Path | None = None) -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if on_path and "pytriton" not in on_path:
        return TritonInstall(Path(on_path), None, {})
    bundled = _bundled_install(cache_dir or default_cache_dir())
    if bundled is None:
        raise LauncherError(
            "tritonserver not found: run inside the NGC tritonserver container or `pip install nvidia-pytriton`"
        )
    return bundled


class TritonServer:
    """A tritonserver child process; a context manager that stops it on exit."""

    def __init__(
        self,
        *,
        model_repository: str | os.PathLike[str] | None = None,
        model_id: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        quantization: str | None = None,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "127.0.0.1",
        with_t5: bool = False,
        t5_model_id: str | None = None,
        exit_timeout_s: int = 30,
        startup_timeout_s: float = 600.0,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        restrict_admin_apis: bool = True,
        admin_key: str | None = None,
        watchdog: bool = True,
        watchdog_interval_s: float = 0.5,
        drain_quiet_s: float = 1.0,
    ) -> None:
        self.model_repository = Path(model_repository) if model_repository else default_model_repository()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.exit_timeout_s = exit_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = list(extra_args)
        self.options = {"model_id": model_id, "dtype": dtype, "device": device, "quantization": quantization}
        # The FlanT5 ensemble lives in a second repository, loaded beside the OPT one when asked for.
        self.with_t5 = with_t5 or bool(t5_model_id)
        self.t5_model_id = t5_model_id
        self.repositories = [self.model_repository]
        if self.with_t5:
            self.repositories.append(default_t5_model_repository())
        self.extra_env = dict(env or {})
        self.restrict_admin_apis = restrict_admin_apis
        # Known to whoever started the server (tests, an operator's TRITON_ADMIN_KEY); random otherwise.
        self.admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_hex(32)
        self.watchdog_enabled = watchdog
        self.watchdog_interval_s = watchdog_interval_s
        self.drain_quiet_s = drain_quiet_s
        # Why the watchdog ended the server (a dead stub), or None.
        self.fault: str | None = None
        self.fault_event = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: StubWatchdog | None = None
        self._stop_lock = threading.Lock()
        self._stop_code: int | None = None
        self._log_file = None

    @property
    def http_hostport(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            *(f"--model-repository={repo}" for repo in self.repositories),
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            # Model control stays off: clients cannot load/unload models on a serving replica.
            "--model-control-mode=none",
            "--log-verbose=0",
            # Each Python stub starts with this much shared memory for tensors. Growing the region remaps it
            # while the LLM engine's thread may hold tensors in it; a region that never needs to grow
            # under normal load avoids that (pages are only used when touched).
            "--backend-config=python,shm-default-byte-size=67108864",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]
        if self.host not in ("0.0.0.0", ""):  # noqa: S104  (a wildcard needs no address flag)
            cmd += [f"--http-address={self.host}", f"--grpc-address={self.host}"]
        if install.backend_directory is not None:
            cmd.append(f"--backend-directory={install.backend_directory}")
        user_restricts = any(a.startswith(("--http-restricted-api", "--grpc-restricted-protocol"))
                             for a in self.extra_args)
        if self.restrict_admin_apis and not user_restricts:
            cmd += restricted_api_args(self.admin_key)
        return cmd + self.extra_args

    def environment(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        env.update(install.env)
        for name, value in self.options.items():
            if value is None:
                continue
            env[env_var(name)] = value
            if name != "model_id":
                env[env_var(name, "BLIP2_T5_")] = value
        if self.t5_model_id is not None:
            env[env_var("model_id", "BLIP2_T5_")] = self.t5_model_id
        env.update(self.extra_env)
        if self.with_t5:
            # Four computing stage processes (two per family) share the cores. An operator's value for either
            # family (shell or `env`) serves both; an empty one counts as unset, as the options read it.
            value = env.get(env_var("cpu_stages")) or env.get(env_var("cpu_stages", "BLIP2_T5_")) or "4"
            for prefix in ("BLIP2_", "BLIP2_T5_"):
                if not env.get(env_var("cpu_stages", prefix)):
                    env[env_var("cpu_stages", prefix)] = value
        return env

    def start(self, *, interrupt: threading.Event | None = None) -> TritonServer:
        """Starts tritonserver and waits until it is ready; callable again after the server ended.

        `interrupt` (a supervisor's stop signal) ends a startup that is still waiting: loading a checkpoint can
        take many minutes, and a stop request must not wait for it."""
        if self._watchdog is not None:
            # After a crash the previous server's watchdog may still be polling: its late fault report must not
            # kill the new server.
            self._watchdog.stop()
            self._watchdog = None
        install = find_tritonserver()
        cmd = self.command(install)
        stdout = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
            stdout = self._log_file
        self.fault = None
        self.fault_event.clear()
        self._stop_code = None
        # Its own session: Ctrl-C (or a supervisor signalling the process group) reaches the launcher only, which
        # drains; tritonserver signalled directly would stop its models at once and fail requests in flight.
        self.process = subprocess.Popen(  # noqa: S603  (our own command line: the tritonserver binary + flags)
            cmd, env=self.environment(install), stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
            start_new_session=True, preexec_fn=end_with_parent(),
        )
        try:
            self.wait_ready(self.startup_timeout_s, interrupt=interrupt)
        except BaseException:
            self._abort_startup()
            raise
        if self.watchdog_enabled:
            process = self.process
            self._watchdog = StubWatchdog(process.pid, lambda reason: self._on_fault(process, reason),
                                          interval_s=self.watchdog_interval_s)
            self._watchdog.start()
        return self

    def _abort_startup(self) -> None:
        # Nothing is served yet, so there is nothing to drain. A tritonserver that exits (on SIGTERM) while it is
        # still loading models leaves the stubs it has started behind, orphaned and waiting forever for it: it is
        # frozen first so that it starts no more, and then killed together with every stub it has.
        proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            kill_server(proc, list(stub_processes(proc.pid).values()))
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _on_fault(self, proc: subprocess.Popen[bytes], reason: str) -> None:
        # Runs on the watchdog thread: end the replica now so probes fail and a supervisor can restart it.
        if proc is not self.process:
            return  # a report about a server that has already been replaced
        log.error("tritonserver: %s; killing tritonserver", reason)
        self.fault = reason
        watchdog = self._watchdog
        kill_server(proc, list(watchdog.stubs.values()) if watchdog else [])
        self.fault_event.set()

    def stub_pids(self) -> dict[str, int]:
        """Model instance name -> stub pid of the running server (for fault tests and diagnostics)."""
        if self.process is None:
            return {}
        return {s.instance: s.pid for s in stub_processes(self.process.pid).values()}

    def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=timeout_s) as r:  # noqa: S310
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float, *, interrupt: threading.Event | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if interrupt is not None and interrupt.is_set():
                raise StartupInterruptedError("stopped during startup")
            if self.process is not None and self.process.poll() is not None:
                raise LauncherError(f"tritonserver exited with code {self.process.returncode} during startup"
                                    + self._log_hint())
            if self.is_ready():
                return
            time.sleep(0.25)
        raise LauncherError(f"tritonserver not ready after {timeout_s:.0f} s" + self._log_hint())

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
        return "\n--- tritonserver log tail ---\n" + "\n".join(tail)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Graceful stop: in-flight requests finish (see watchdog.drain_and_stop), new ones are refused."""
        with self._stop_lock:
            return self._stop(timeout_s)

    def _stop(self, timeout_s: float | None) -> int | None:
        proc = self.process
        if proc is None:
            return None
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if proc.poll() is None:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104  (wildcard -> loopback)
            endpoints = Endpoints((host, self.http_port), f"http://{host}:{self.metrics_port}/metrics")
            # 0 also when the drained server had to be ended because idle client connections held it.
            self._stop_code = drain_and_stop(
                proc,
                endpoints,
                exit_timeout_s=timeout_s if timeout_s is not None else self.exit_timeout_s,
                quiet_s=self.drain_quiet_s,
            )
        self._close_log()
        return self._stop_code if self._stop_code is not None else proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
