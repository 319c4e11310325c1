"""`TritonServer`: one tritonserver child process under the stub watchdog, drained on stop."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .command import WILDCARDS, stage_environment, tritonserver_command
from .drain import Endpoints, drain_and_stop
from .install import find_tritonserver
from .processes import Stub, end_stubs, end_with_parent, kill_server, running, stub_processes
from .settings import LauncherError, LaunchSettings, StartupInterruptedError
from .watchdog import StubWatchdog

log = logging.getLogger(__name__)


class TritonServer:
    """A tritonserver child process; a context manager that starts it and drains and stops it on exit."""

    def __init__(self, settings: LaunchSettings | None = None, *, log_path: str | os.PathLike[str] | None = None
                 ) -> None:
        self.settings = settings or LaunchSettings()
        self.log_path = Path(log_path) if log_path else None
        # A wildcard bind is reached on loopback.
        host = "127.0.0.1" if self.settings.host in WILDCARDS else self.settings.host
        self.http_hostport = f"{host}:{self.settings.http_port}"
        self.http_url = f"http://{self.http_hostport}"
        self.grpc_url = f"{host}:{self.settings.grpc_port}"
        self.metrics_url = f"http://{host}:{self.settings.metrics_port}/metrics"
        self._endpoints = Endpoints((host, self.settings.http_port), self.metrics_url)
        # Why the watchdog ended the server (a dead stub), or None.
        self.fault: str | None = None
        self.fault_event = threading.Event()
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: StubWatchdog | None = None
        self._stop_lock = threading.Lock()
        self._stop_code: int | None = None
        self._log_file: BinaryIO | None = None
        # The stubs of the current (or last) server, kept so that none outlives it (`_end_stubs`).
        self._stubs: dict[int, Stub] = {}

    def start(self, *, interrupt: threading.Event | None = None) -> TritonServer:
        """Starts tritonserver and waits until it is ready; callable again after the server ended.

        `interrupt` (a supervisor's stop signal) ends a startup that is still waiting: loading a checkpoint can
        take many minutes, and a stop request must not wait for it."""
        if self._watchdog is not None:
            # The previous server's watchdog may still be polling: its late fault report must not kill this one.
            self._watchdog.stop()
            self._watchdog = None
        # A stub of the previous server that still runs holds its memory (on a GPU too): never start beside it.
        self._end_stubs()
        install = find_tritonserver()
        cmd = tritonserver_command(self.settings, install)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        self.fault = None
        self.fault_event.clear()
        self._stop_code = None
        # Its own session: Ctrl-C (or a supervisor signalling the process group) reaches the supervisor only, which
        # drains; tritonserver signalled directly would stop its models at once and fail requests in flight.
        self.process = subprocess.Popen(  # noqa: S603  (our own command line: the tritonserver binary + flags)
            cmd, env=stage_environment(self.settings, install, os.environ), stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file else None, start_new_session=True,
            preexec_fn=end_with_parent(),
        )
        try:
            self.wait_ready(self.settings.startup_timeout_s, interrupt=interrupt)
        except BaseException:
            self._abort_startup()
            raise
        self._stubs = stub_processes(self.process.pid)
        if self.settings.watchdog:
            process = self.process
            self._watchdog = StubWatchdog(process.pid, lambda reason: self._on_fault(process, reason),
                                          interval_s=self.settings.watchdog_interval_s).start()
            self._stubs = self._watchdog.stubs  # the watchdog adopts stubs Triton starts later
        return self

    def healthy(self) -> bool:
        """Serving as far as the supervisor can see: tritonserver runs, no stub died or is paused."""
        return (self.process is not None and running(self.process.pid) and self.fault is None
                and (self._watchdog is None or self._watchdog.healthy))

    def _end_stubs(self) -> None:
        stuck = end_stubs(list(self._stubs.values()))
        self._stubs = {}
        if stuck:
            raise LauncherError("stub processes of the previous tritonserver do not exit: "
                                + ", ".join(f"{s.instance} (pid {s.pid})" for s in stuck))

    def _abort_startup(self) -> None:
        # Nothing is served yet, so nothing to drain. A tritonserver that exits while still loading leaves the stubs
        # it started orphaned, waiting forever: freeze it so it starts no more, then kill it with every stub.
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
        """Graceful stop: in-flight requests finish (drain.drain_and_stop), new ones are refused."""
        with self._stop_lock:
            proc = self.process
            if proc is None:
                return None
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None
            if proc.poll() is None:
                # 0 also when the drained server had to be ended because idle client connections held it.
                self._stop_code = drain_and_stop(
                    proc, self._endpoints, quiet_s=self.settings.drain_quiet_s,
                    exit_timeout_s=timeout_s if timeout_s is not None else self.settings.exit_timeout_s,
                )
            # A server that crashed (or aborted) leaves its stubs behind: end them and their shm regions.
            with contextlib.suppress(LauncherError):
                self._end_stubs()
            self._close_log()
            return self._stop_code if self._stop_code is not None else proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
