"""Health and shutdown control around a `tritonserver` process: stub watchdog, graceful drain, wrapper CLI.

Two Triton 2.51 behaviours make a plain `tritonserver` unsafe to put behind a load balancer:

* When a Python backend stub dies (kill -9, OOM killer, segfault in a native library), Triton keeps answering
  `/v2/health/ready` and `/v2/health/live` with 200 while every request routed to that model fails with
  `Stub process '<instance>' is not healthy`, and a later SIGTERM waits the whole exit timeout. The watchdog
  watches the stub children of tritonserver in /proc and, when one dies, kills the server (and its stubs, and
  their shared-memory regions) so the replica is visibly gone: probes fail, the orchestrator or `blip2-triton
  serve --max-restarts` starts a fresh one. It assumes the model set is static (`--model-control-mode=none`, as
  everywhere here): a stub that Triton stops itself on a model unload would look like a death.
* On SIGTERM Triton first closes its HTTP listener and waits for open HTTP connections, then stops every
  model's scheduler and waits for in-flight requests. An ensemble request still between two steps at that
  point fails with "Server is stopping" because the next step's scheduler no longer accepts it, so in-flight
  gRPC requests are lost. `drain_and_stop` holds one HTTP connection open across the SIGTERM, which keeps
  Triton in its first phase (new HTTP connections refused, probes failing, everything in flight still
  running) until the server is idle, and only then lets it stop its models.

`python -m blip2_triton.watchdog -- tritonserver ARGS...` runs both around a server command; the container
entrypoint uses it (BLIP2_WATCHDOG=0 turns it off there).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
# Where Triton's Python backend maps its per-stub regions (POSIX shm); names only, nothing created here.
SHM_DIR = Path("/dev/shm")  # noqa: S108
STUB_BINARY = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region"
# Exit status of the wrapper and of `blip2-triton serve` after a stub died: EX_SOFTWARE, distinct from
# Triton's own failures (1) and from signals (128+n).
FAULT_EXIT_CODE = 70


# --- /proc ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stub:
    pid: int
    # Start time in clock ticks since boot: a pid reused by another process after the stub died differs.
    start_ticks: int
    # Triton's model instance name, e.g. `blip2_vision_0_0`; the name its "not healthy" error uses.
    instance: str
    shm_region: str | None


def _stat_fields(pid: int, proc: Path = PROC) -> list[str] | None:
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    head, _, rest = raw.rpartition(")")
    if not head:
        return None
    return rest.split()


def process_state(pid: int, proc: Path = PROC) -> str | None:
    """One-letter state (R, S, D, Z, ...) or None when the process is gone."""
    fields = _stat_fields(pid, proc)
    return fields[0] if fields else None


def cpu_ticks(pid: int, proc: Path = PROC) -> int:
    fields = _stat_fields(pid, proc)
    # Fields after the command name start at index 2 of stat(5); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12]) if fields else 0


def _start_ticks(fields: list[str]) -> int:
    return int(fields[19])


def _comm(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def stub_processes(server_pid: int, proc: Path = PROC) -> dict[int, Stub]:
    """The Python backend stubs tritonserver `server_pid` started, by pid. Dead ones not yet reaped (zombies)
    are included: Triton reaps the stubs it stops itself, so a zombie stub is one that died."""
    stubs: dict[int, Stub] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name), proc)
        if not fields or int(fields[1]) != server_pid:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if not args and fields[0] == "Z" and _comm(entry) == STUB_BINARY[:15]:
            # A zombie has no command line left; its name (truncated to 15 characters) still tells.
            stubs[int(entry.name)] = Stub(int(entry.name), _start_ticks(fields), "unknown (already dead)", None)
            continue
        # argv: stub model.py shm_region shm_default shm_growth parent_pid backend_dir ipc_size instance kind,
        # possibly behind an interpreter when the stub is a script.
        at = next((i for i, a in enumerate(args[:2]) if a.endswith(STUB_BINARY)), None)
        if at is None:
            continue
        shm = next((a for a in args if a.startswith(SHM_PREFIX)), None)
        instance = args[at + 8] if len(args) > at + 8 else "unknown"
        stubs[int(entry.name)] = Stub(int(entry.name), _start_ticks(fields), instance, shm)
    return stubs


def stub_is_alive(stub: Stub, proc: Path = PROC) -> bool:
    fields = _stat_fields(stub.pid, proc)
    return bool(fields) and fields[0] not in ("Z", "X") and _start_ticks(fields) == stub.start_ticks


# --- stub watchdog ----------------------------------------------------------------------------------------


class StubWatchdog:
    """Polls the stubs of a running tritonserver; reports the first one that died through `on_fault`.

    Arm it once the server is ready: during model loading Triton starts and stops stubs on its own.
    """

    def __init__(
        self,
        server_pid: int,
        on_fault: Callable[[str], None],
        *,
        interval_s: float = 0.5,
        proc: Path = PROC,
    ) -> None:
        self.server_pid = server_pid
        self.on_fault = on_fault
        self.interval_s = interval_s
        self.proc = proc
        self.stubs: dict[int, Stub] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """One poll: a description of the first dead stub, else None (and newly started stubs are adopted)."""
        for stub in list(self.stubs.values()):
            if not stub_is_alive(stub, self.proc):
                return f"stub process of model instance '{stub.instance}' (pid {stub.pid}) died"
        if process_state(self.server_pid, self.proc) in (None, "Z", "X"):
            # The server itself is gone; whoever waits on it reports that, not the watchdog.
            return None
        for pid, stub in stub_processes(self.server_pid, self.proc).items():
            self.stubs.setdefault(pid, stub)
        return None

    def start(self) -> StubWatchdog:
        self.stubs = stub_processes(self.server_pid, self.proc)
        log.info("watchdog: watching %d stub processes of tritonserver pid %d: %s", len(self.stubs),
                 self.server_pid, ", ".join(sorted(s.instance for s in self.stubs.values())))
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            fault = self.check()
            if fault is not None:
                self.on_fault(fault)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def kill_server(proc: subprocess.Popen[bytes], stubs: Sequence[Stub] = (), shm_dir: Path = SHM_DIR) -> int:
    """Ends a broken server at once: SIGTERM would wait the whole exit timeout on a dead stub."""
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    for stub in stubs:
        # Stubs exit when their parent goes; one that is stuck must not keep GPU memory.
        if stub_is_alive(stub):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub.pid, signal.SIGKILL)
    remove_shm_regions(stubs, shm_dir)
    return code


PR_SET_PDEATHSIG = 1


def end_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent `signum` when this process dies, even by SIGKILL; None where it
    cannot be armed safely.

    Without it a SIGKILLed launcher (OOM killer, `kill -9`, a supervisor's hard stop) leaves tritonserver
    running, holding its ports and memory. SIGTERM lets a serving orphan unload its models and remove its stubs'
    shared memory (a server still loading may leave stubs behind, as for any SIGTERM then; see ROBUSTNESS.md).
    Linux ties the signal to the thread that forks, not the process, so it is armed only from the main thread,
    which lives as long as the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl, set_handler = libc.prctl, libc.signal
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    set_handler.argtypes, set_handler.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    parent = os.getpid()

    def arm() -> None:
        # Runs in the child between fork and exec: nothing here may import or take a lock. The parent's Python
        # handler for `signum` stays installed until exec and would swallow a signal that came before it; the
        # default action (0, SIG_DFL) ends the child instead.
        set_handler(int(signum), 0)
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died before the signal was armed: it will never come, so do not start at all.
            os._exit(1)

    return arm


def remove_shm_regions(stubs: Sequence[Stub], shm_dir: Path = SHM_DIR) -> None:
    # Triton unlinks these on a clean shutdown only; in a pod /dev/shm is a memory-backed volume that outlives
    # container restarts, so leaked regions would eat the memory limit restart after restart.
    for stub in stubs:
        if stub.shm_region and "/" not in stub.shm_region:
            with contextlib.suppress(FileNotFoundError):
                (shm_dir / stub.shm_region).unlink()


# --- graceful drain ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    """Where the drain controller reaches the server; None disables that signal."""

    http: tuple[str, int] | None
    metrics_url: str | None


_PENDING_RE = re.compile(r"^nv_inference_pending_request_count\{[^}]*\} (\S+)$", re.M)


class _HeldConnection:
    """A keep-alive HTTP connection opened before SIGTERM; Triton keeps serving while it is open."""

    def __init__(self, host: str, port: int, timeout_s: float = 5.0) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        self.get("/v2/health/live")

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        return response.read()

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
    """Decides when a draining server is idle: nothing queued (Triton's pending-request gauge), no request
    completed, and the stub processes burned no CPU for `quiet_s`. Triton exposes no in-flight count, and an
    executing stage always uses CPU (CPU inference, or the Python loop driving the GPU), so together these
    see queued, executing and finishing work."""

    def __init__(
        self,
        stub_pids: Callable[[], Sequence[int]],
        pending: Callable[[], int | None],
        completed: Callable[[], int | None],
        *,
        quiet_s: float = 1.0,
        idle_ticks_per_s: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stub_pids, self.pending, self.completed = stub_pids, pending, completed
        self.quiet_s = quiet_s
        self.idle_ticks_per_s = idle_ticks_per_s
        self.clock = clock
        self._last: tuple[float, int, int | None] | None = None
        self._quiet_since: float | None = None

    def _ticks(self) -> int:
        return sum(cpu_ticks(pid) for pid in self.stub_pids())

    def idle(self) -> bool:
        now, ticks, done = self.clock(), self._ticks(), self.completed()
        pending = self.pending()
        busy = bool(pending)
        if self._last is not None:
            then, last_ticks, last_done = self._last
            elapsed = max(now - then, 1e-3)
            busy = busy or (ticks - last_ticks) > self.idle_ticks_per_s * elapsed + 1
            busy = busy or (done is not None and last_done is not None and done != last_done)
        else:
            busy = True
        self._last = (now, ticks, done)
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
    pids = [s.pid for s in stubs]
    proc.send_signal(signal.SIGTERM)
    drained = False
    if held is not None:
        # Keep a share of the exit timeout for Triton's own model shutdown once the hold is released.
        deadline = started + max(exit_timeout_s - max(3.0, exit_timeout_s / 5), 0.0)
        monitor = DrainMonitor(lambda: pids, lambda: _pending_requests(endpoints.metrics_url),
                               held.completed_requests, quiet_s=quiet_s)
        while time.monotonic() < deadline and proc.poll() is None:
            if monitor.idle():
                drained = True
                break
            time.sleep(poll_s)
        log.info("drain: %s after %.1f s", "idle" if drained else "deadline reached", time.monotonic() - started)
        held.close()
    remaining = max(exit_timeout_s - (time.monotonic() - started), 0.0)
    try:
        # Drained, Triton stops its idle models in a second or two, unless other clients keep idle keep-alive
        # connections open: it then waits for them until the exit timeout and exits with "Exit timeout
        # expired" anyway. Nothing is in flight any more, so it is ended here instead of waiting.
        return int(proc.wait(timeout=min(settle_s, remaining) if drained else remaining + kill_after_s))
    except subprocess.TimeoutExpired:
        if drained:
            log.info("drain: tritonserver still waits for idle client connections; ending it")
        else:
            log.error("tritonserver did not exit within its exit timeout; killing it")
        # A stuck stub (a wedged CUDA call) would outlive its killed parent and keep its GPU memory.
        code = int(kill_server(proc, stubs))
        return 0 if drained else code


# --- tritonserver command line ----------------------------------------------------------------------------


def _flag(args: Sequence[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _enabled(args: Sequence[str], name: str) -> bool:
    return (_flag(args, name) or "true").lower() not in ("false", "0", "no", "off")


def endpoints_from_args(args: Sequence[str]) -> Endpoints:
    """The HTTP and metrics endpoints a tritonserver command line serves, as reachable from this host."""

    def local(address: str | None) -> str:
        # A wildcard bind is reachable on loopback.
        return "127.0.0.1" if address in (None, "", "0.0.0.0", "::", "[::]") else str(address)  # noqa: S104

    http_ep = None
    if _enabled(args, "allow-http"):
        http_ep = (local(_flag(args, "http-address")), int(_flag(args, "http-port") or 8000))
    metrics = None
    if _enabled(args, "allow-metrics"):
        host = local(_flag(args, "metrics-address") or _flag(args, "http-address"))
        metrics = f"http://{host}:{int(_flag(args, 'metrics-port') or 8002)}/metrics"
    return Endpoints(http_ep, metrics)


def exit_timeout_from_args(args: Sequence[str]) -> float:
    return float(_flag(args, "exit-timeout-secs") or 30)


def http_ready(endpoint: tuple[str, int] | None, timeout_s: float = 2.0) -> bool:
    if endpoint is None:
        return False
    url = f"http://{endpoint[0]}:{endpoint[1]}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --- wrapper CLI (container entrypoint) ----------------------------------------------------------------------


@contextlib.contextmanager
def _forward_signals(stop: threading.Event) -> Iterator[None]:
    # As PID 1 of a container this process gets no default signal handling: catch and act on them.
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def run_wrapped(cmd: Sequence[str], *, interval_s: float = 0.5, quiet_s: float = 1.0) -> int:
    """Runs `cmd` (a tritonserver command line) under the watchdog until it exits, a stub dies or a signal
    asks it to stop; returns the exit status for the wrapper."""
    endpoints = endpoints_from_args(cmd)
    exit_timeout = exit_timeout_from_args(cmd)
    stop = threading.Event()
    fault: list[str] = []
    with _forward_signals(stop):
        proc = subprocess.Popen(list(cmd), preexec_fn=end_with_parent())  # noqa: S603  (the operator's own command)
        watchdog: StubWatchdog | None = None

        def on_fault(reason: str) -> None:
            fault.append(reason)
            stop.set()

        while True:
            if proc.poll() is not None:
                if watchdog is not None:
                    watchdog.stop()
                return _exit_status(int(proc.returncode))
            if stop.is_set():
                break
            if watchdog is None and http_ready(endpoints.http, timeout_s=1.0):
                watchdog = StubWatchdog(proc.pid, on_fault, interval_s=interval_s).start()
            stop.wait(interval_s if watchdog is not None else 1.0)
        if watchdog is not None:
            watchdog.stop()
        if fault:
            print(f"blip2-triton watchdog: {fault[0]}; killing tritonserver so the replica restarts",
                  file=sys.stderr, flush=True)
            kill_server(proc, list(watchdog.stubs.values()) if watchdog else [])
            return FAULT_EXIT_CODE
        print("blip2-triton watchdog: draining in-flight requests, then stopping tritonserver",
              file=sys.stderr, flush=True)
        code = drain_and_stop(proc, endpoints, exit_timeout_s=exit_timeout, quiet_s=quiet_s)
        return 0 if code in (0, -signal.SIGTERM) else _exit_status(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_triton.watchdog",
        description="Run tritonserver under the stub watchdog and drain controller "
        "(`python -m blip2_triton.watchdog [options] -- tritonserver ARGS...`).",
    )
    parser.add_argument("--interval-s", type=float, default=0.5, help="stub poll interval")
    parser.add_argument("--drain-quiet-s", type=float, default=1.0,
                        help="idle time that ends the drain after SIGTERM")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no tritonserver command given (after `--`)")
    logging.basicConfig(level=logging.INFO, format="blip2-triton watchdog: %(message)s", stream=sys.stderr)
    return run_wrapped(cmd, interval_s=args.interval_s, quiet_s=args.drain_quiet_s)


if __name__ == "__main__":
    sys.exit(main())
