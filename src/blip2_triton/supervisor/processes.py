"""The processes around tritonserver, seen through psutil: its Python backend stubs, whether they live, and
ending them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

# Where Triton's Python backend maps its per-stub regions (POSIX shm); names only, nothing created here.
SHM_DIR = Path("/dev/shm")  # noqa: S108
STUB_BINARY = "triton_python_backend_stub"
SHM_PREFIX = "triton_python_backend_shm_region"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Stub:
    pid: int
    # Clock ticks from boot to the stub's start: a pid reused after the stub died differs. Not psutil's
    # create_time, which adds a boot time the kernel recomputes when the clock is adjusted (a false "died").
    created: int
    # Triton's model instance name, e.g. `blip2_vision_0_0`; the name its "not healthy" error uses.
    instance: str
    shm_region: str | None

    def alive(self) -> bool:
        return self._status() not in (None, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)

    def paused(self) -> bool:
        """Stopped by a signal (SIGSTOP, a debugger): it answers nothing until resumed."""
        return self._status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)

    def _status(self) -> str | None:
        try:
            process = psutil.Process(self.pid)
            return process.status() if start_ticks(self.pid) == self.created else None
        except (psutil.NoSuchProcess, OSError):
            return None


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat; the command name before it may hold spaces and parentheses."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def running(pid: int) -> bool:
    """Exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _as_stub(child: psutil.Process) -> Stub | None:
    try:
        created = start_ticks(child.pid)
        if child.status() == psutil.STATUS_ZOMBIE:
            # A zombie has no command line left; its name (truncated to 15 characters) still tells.
            dead = child.name()[:15] == STUB_BINARY[:15]
            return Stub(child.pid, created, "unknown (already dead)", None) if dead else None
        args = child.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return None
    # argv: stub model.py shm_region shm_default shm_growth parent_pid backend_dir ipc_size instance kind,
    # possibly behind an interpreter when the stub is a script.
    at = next((i for i, a in enumerate(args[:2]) if a.endswith(STUB_BINARY)), None)
    if at is None:
        return None
    shm = next((a for a in args if a.startswith(SHM_PREFIX)), None)
    return Stub(child.pid, created, args[at + 8] if len(args) > at + 8 else "unknown", shm)


def stub_processes(server_pid: int) -> dict[int, Stub]:
    """The Python backend stubs tritonserver `server_pid` started, by pid. Dead ones not yet reaped (zombies)
    are included: Triton reaps the stubs it stops itself, so a zombie stub is one that died."""
    try:
        children = psutil.Process(server_pid).children()
    except psutil.NoSuchProcess:
        return {}
    return {stub.pid: stub for stub in map(_as_stub, children) if stub is not None}


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def kill_server(proc: subprocess.Popen[bytes], stubs: Sequence[Stub] = (), shm_dir: Path = SHM_DIR) -> int:
    """Ends a broken server at once: SIGTERM would wait the whole exit timeout on a dead stub."""
    if proc.poll() is None:
        proc.kill()
    code = proc.wait()
    end_stubs(stubs, shm_dir)
    return code


def end_stubs(stubs: Sequence[Stub], shm_dir: Path = SHM_DIR, *, timeout_s: float = 10.0) -> list[Stub]:
    """Kills the stubs of a server that has ended and removes their shm regions; the ones still alive after
    `timeout_s` (stuck in the kernel) are returned."""
    # Stubs exit when their parent goes, but a stopped or wedged one never does, and keeps its (GPU) memory.
    alive = [stub for stub in stubs if stub.alive()]
    for stub in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stub.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (alive := [stub for stub in alive if stub.alive()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    remove_shm_regions(stubs, shm_dir)
    return alive


def remove_shm_regions(stubs: Sequence[Stub], shm_dir: Path = SHM_DIR) -> None:
    # Triton unlinks these on a clean shutdown only; a pod's /dev/shm volume outlives container restarts.
    for stub in stubs:
        if stub.shm_region and "/" not in stub.shm_region:
            with contextlib.suppress(FileNotFoundError):
                (shm_dir / stub.shm_region).unlink()


def end_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` that has the child sent `signum` when this process dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG); None where it cannot be armed safely.

    Linux ties the signal to the thread that forks, so it is armed only from the main thread, which lives as long
    as the process (docs/ROBUSTNESS.md).
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
        # handler for `signum` stays installed until exec and would swallow an early signal; SIG_DFL (0) does not.
        set_handler(int(signum), 0)
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died before the signal was armed: it will never come, so do not start at all.
            os._exit(1)

    return arm
