"""The one supervision loop, for `blip2-triton serve` and the container (whose entrypoint runs it as PID 1):
start tritonserver, drain it on SIGTERM/SIGINT, restart it after a fault within a budget, else exit."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .server import TritonServer
from .settings import LauncherError, LaunchSettings, StartupInterruptedError

if TYPE_CHECKING:
    from ..front import Front

# Exit status after a stub died: EX_SOFTWARE, apart from Triton's own failures (1) and signals (128+n).
FAULT_EXIT_CODE = 70


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _say(message: str) -> None:
    print(f"blip2-triton: {message}", file=sys.stderr, flush=True)


def _failure_code(server: TritonServer) -> int:
    if server.fault:
        return FAULT_EXIT_CODE
    code = server.process.returncode if server.process is not None else None
    return exit_status(code) if code else 1


def supervise(server: TritonServer, stop: threading.Event, front: Front | None = None) -> int:
    """Serves until `stop` is set (drain; 0) or tritonserver ends past `max_restarts` (its failure status). With a
    front, clients reach Triton through it; it stops first on a drain, so nothing new reaches Triton."""
    settings = server.settings
    restarts: list[float] = []
    while True:
        try:
            server.start(interrupt=stop)
            public = front or server
            playground = f"  playground={front.playground_url}" if front is not None and front.playground_url else ""
            _say(f"ready  http={public.http_url}  grpc={public.grpc_url}  metrics={server.metrics_url}{playground}")
        except StartupInterruptedError:
            _say("stopped during startup")
            return 0
        except LauncherError as e:
            _say(str(e))
            if server.process is None or (not restarts and not settings.max_restarts):
                return 1  # no process at all (no tritonserver or stub found), or no budget: restarting cannot help
        process = server.process
        while not stop.is_set() and process.poll() is None:
            stop.wait(0.2)
        if process.poll() is None:
            _say("stopping (draining in-flight requests)")
            if front is not None:
                front.stop()  # refuses new requests, lets those in flight finish
            code = server.stop()
            return 0 if code in (0, -signal.SIGTERM) else exit_status(int(code or 1))
        _say(server.fault or f"tritonserver exited with code {process.returncode}")
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < settings.restart_window_s]
        if stop.is_set() or len(restarts) >= settings.max_restarts:
            if settings.max_restarts and not stop.is_set():
                _say(f"{len(restarts)} restarts within {settings.restart_window_s:.0f} s; giving up")
            server.stop()
            return _failure_code(server)
        restarts.append(now)
        _say(f"restarting tritonserver ({len(restarts)}/{settings.max_restarts} within "
             f"{settings.restart_window_s:.0f} s)")
        # Backoff: a server that fails at once would otherwise spin through its restarts in seconds.
        if stop.wait(min(2.0 ** (len(restarts) - 1), 30.0)):
            server.stop()
            return _failure_code(server)


def serve(settings: LaunchSettings, *, front: Mapping[str, Any] | None = None) -> int:
    """`supervise` with SIGTERM and SIGINT as the stop request (as PID 1 nothing handles them by default), behind
    the front unless `settings.front` is off; `front`: options of the front beyond its `BLIP2_FRONT_*` variables."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    running: Front | None = None
    try:
        if not settings.front:
            return supervise(TritonServer(settings), stop)
        from ..errors import ConfigurationError
        from ..front import Front, FrontSettings, FrontStartupError

        server = TritonServer(settings.behind_front())
        try:
            front_settings = FrontSettings.from_env(
                os.environ, host=settings.host, http_port=settings.http_port, grpc_port=settings.grpc_port,
                triton_http=server.http_hostport, triton_grpc=server.grpc_url, **dict(front or {}))
            # Up before Triton: probes get a real "not ready" while checkpoints load, and the ports are held.
            running = Front(front_settings, ready=lambda: not stop.is_set() and server.healthy()).start()
        except (ConfigurationError, FrontStartupError) as e:
            _say(f"front: {e}")
            return 1
        return supervise(server, stop, running)
    finally:
        if running is not None:
            running.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
