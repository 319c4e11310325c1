"""Graceful stop. On SIGTERM Triton 2.51 stops its models' schedulers once no HTTP connection is open, failing
ensemble requests between two steps; holding one connection keeps it serving what is in flight (new HTTP
connections refused) until the server is idle (docs/ROBUSTNESS.md, "SIGTERM under load")."""

from __future__ import annotations

import http.client
import json
import logging
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from .processes import cpu_seconds, kill_server, stub_processes

log = logging.getLogger(__name__)

_PENDING_RE = re.compile(r"^nv_inference_pending_request_count\{[^}]*\} (\S+)$", re.M)


@dataclass(frozen=True)
class Endpoints:
    """Where the drain controller reaches the server; None disables that signal."""

    http: tuple[str, int] | None
    metrics_url: str | None


class _HeldConnection:
    """A keep-alive HTTP connection opened before SIGTERM; Triton keeps serving while it is open."""

    def __init__(self, host: str, port: int, timeout_s: float = 5.0) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.get("/v2/health/live")

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        return self.conn.getresponse().read()

    def completed_requests(self) -> int | None:
        try:
            stats = json.loads(self.get("/v2/models/stats"))
        except (OSError, http.client.HTTPException, ValueError):
            return None
        total = 0
        for model in stats.get("model_stats", []):
            inference = model.get("inference_stats", {})
            total += int(inference.get("success", {}).get("count", 0)) + int(inference.get("fail", {}).get("count", 0))
        return total

    def close(self) -> None:
        self.conn.close()


def _pending_requests(metrics_url: str | None) -> int | None:
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as r:  # noqa: S310  (a URL we built: http://host:port)
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return int(sum(float(v) for v in _PENDING_RE.findall(text)))


class DrainMonitor:
    """Decides when a draining server is idle: nothing queued, no request completed, and the stubs burned no CPU
    for `quiet_s`. Triton exposes no in-flight count; an executing stage always uses CPU."""

    def __init__(
        self,
        cpu_seconds: Callable[[], float],
        pending: Callable[[], int | None],
        completed: Callable[[], int | None],
        *,
        quiet_s: float = 1.0,
        idle_cpu_per_s: float = 0.04,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cpu_seconds, self.pending, self.completed = cpu_seconds, pending, completed
        self.quiet_s = quiet_s
        self.idle_cpu_per_s = idle_cpu_per_s
        self.clock = clock
        self._last: tuple[float, float, int | None] | None = None
        self._quiet_since: float | None = None

    def idle(self) -> bool:
        now, cpu, done = self.clock(), self.cpu_seconds(), self.completed()
        busy = bool(self.pending()) or self._last is None
        if self._last is not None:
            then, last_cpu, last_done = self._last
            # One clock tick (10 ms) of slack: CPU times are counted in ticks.
            busy = busy or (cpu - last_cpu) > self.idle_cpu_per_s * max(now - then, 1e-3) + 0.01
            busy = busy or (done is not None and last_done is not None and done != last_done)
        self._last = (now, cpu, done)
        if busy or self._quiet_since is None:
            # The work seen happened before this sample: quiet counts from here.
            self._quiet_since = now
            return False
        return now - self._quiet_since >= self.quiet_s


def drain_and_stop(
    proc: subprocess.Popen[bytes],
    endpoints: Endpoints,
    *,
    exit_timeout_s: float,
    quiet_s: float = 1.0,
    poll_s: float = 0.1,
    settle_s: float = 3.0,
    kill_after_s: float = 15.0,
) -> int:
    """SIGTERM with a drain in front. Returns the server's exit status (negative: killed by that signal), or 0
    when the server was drained and then had to be ended because it kept waiting for idle client connections."""
    if proc.poll() is not None:
        return int(proc.returncode)
    started = time.monotonic()
    held: _HeldConnection | None = None
    if endpoints.http is not None:
        try:
            held = _HeldConnection(*endpoints.http)
        except (OSError, http.client.HTTPException) as e:
            log.warning("drain: cannot hold an HTTP connection (%s); stopping without drain", e)
    stubs = list(stub_processes(proc.pid).values())
    proc.send_signal(signal.SIGTERM)
    drained = False
    if held is not None:
        # Keep a share of the exit timeout for Triton's own model shutdown once the hold is released.
        deadline = started + max(exit_timeout_s - max(3.0, exit_timeout_s / 5), 0.0)
        monitor = DrainMonitor(lambda: cpu_seconds(s.pid for s in stubs),
                               lambda: _pending_requests(endpoints.metrics_url), held.completed_requests,
                               quiet_s=quiet_s)
        while time.monotonic() < deadline and proc.poll() is None:
            if monitor.idle():
                drained = True
                break
            time.sleep(poll_s)
        log.info("drain: %s after %.1f s", "idle" if drained else "deadline reached", time.monotonic() - started)
        held.close()
    remaining = max(exit_timeout_s - (time.monotonic() - started), 0.0)
    try:
        # Drained, Triton stops its idle models in seconds, unless idle keep-alive connections of other clients
        # hold it until the exit timeout; nothing is in flight any more, so it is ended after `settle_s`.
        return int(proc.wait(timeout=min(settle_s, remaining) if drained else remaining + kill_after_s))
    except subprocess.TimeoutExpired:
        if drained:
            log.info("drain: tritonserver still waits for idle client connections; ending it")
        else:
            log.error("tritonserver did not exit within its exit timeout; killing it")
        # A stuck stub (a wedged CUDA call) would outlive its killed parent and keep its GPU memory.
        code = int(kill_server(proc, stubs))
        return 0 if drained else code
