"""How the stage processes of a CPU host share its cores: each its own share of them, or all of them in turns.

On CPU the vision and LLM stage processes each run torch with a pool of OpenMP threads. With a pool as large as the
host in each, both computing at once oversubscribe the cores twice over, and OpenMP's spinning threads slow both
down far more than taking turns would. Two ways out (figures: docs/BENCHMARK.md):

* **Split** (`compute_lock=auto` or `off`, the default): each stage process gets its own share of the cores
  (`stage_threads`: half of them, as an ensemble has two computing stages) and the stages overlap. The in-flight
  engine steps all the time and the vision stage computes whenever images arrive, so this keeps both busy: the
  better choice under load.
* **Turns** (`compute_lock=on`): every forward pass takes a host-wide lock and runs on all cores. Better where one
  stage idles while the other computes, as with one request at a time.

The lock is an advisory file lock (`flock`) that every stage process of the host opens. A second "entry" lock
makes it fair: a waiter holds the entry lock while it waits, so the process that just released the compute lock
cannot take it again before that waiter (the LLM engine would otherwise starve the vision stage, stepping in a
tight loop).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from .options import ServerOptions

log = logging.getLogger(__name__)


def default_lock_file() -> Path:
    return Path(tempfile.gettempdir()) / f"blip2-triton-compute-{os.getuid()}.lock"


class ComputeLock:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._local = threading.local()
        self._thread_lock = threading.RLock()
        self._fds: tuple[int, int] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = os.open(f"{path}.entry", os.O_RDWR | os.O_CREAT, 0o600)
            compute = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self._fds = (entry, compute)

    @classmethod
    def for_stage(cls, setting: str, lock_file: str = "") -> ComputeLock:
        """`setting` is on/off/auto; only `on` takes turns (auto: the stages split the cores instead)."""
        if setting != "on":
            return cls(None)
        path = Path(lock_file) if lock_file else default_lock_file()
        try:
            lock = cls(path)
            log.info("compute lock on: forward passes take turns with the host's other stages (%s)", path)
            return lock
        except OSError as e:
            # A read-only or missing temp dir must not stop the server, but each stage then runs on every core.
            log.warning("compute lock disabled: cannot open %s (%s); the stages will overlap on all cores, "
                        "set BLIP2_COMPUTE_LOCK_FILE to a writable path or BLIP2_COMPUTE_LOCK=auto", path, e)
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self._fds is not None

    def __enter__(self) -> ComputeLock:
        if self._fds is None:
            return self
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            # Threads of one process share the file description, so flock alone would not keep them apart.
            self._thread_lock.acquire()
            entry, compute = self._fds
            try:
                fcntl.flock(entry, fcntl.LOCK_EX)
                try:
                    fcntl.flock(compute, fcntl.LOCK_EX)
                finally:
                    fcntl.flock(entry, fcntl.LOCK_UN)
            except BaseException:
                self._thread_lock.release()
                raise
        self._local.depth = depth + 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fds is None:
            return
        self._local.depth -= 1
        if self._local.depth == 0:
            fcntl.flock(self._fds[1], fcntl.LOCK_UN)
            self._thread_lock.release()

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None


_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


def _cgroup_limit(v2: Path, v1: Path) -> int | None:
    """Whole cores a cgroup CPU quota allows (rounded down: a 3.5-CPU limit runs 3 threads unthrottled)."""
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (v1 / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def available_cores(cgroup_v2: Path = _CGROUP_V2, cgroup_v1: Path = _CGROUP_V1) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a Kubernetes `limits.cpu`).

    torch sizes its pool from the host's cores, which in a pod limited to 4 CPUs on a 64-core node is 16x too many.
    Only the process's own cgroup is read (`/sys/fs/cgroup` as containers mount it), not quotas set on ancestors.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = _cgroup_limit(cgroup_v2, cgroup_v1)
    return max(1, min(cores, limit) if limit else cores)


def stage_threads(options: ServerOptions, device: str, *, cores: int | None = None,
                  env: dict[str, str] | None = None, torch_default: int | None = None) -> int | None:
    """torch threads for one stage process, or None to leave torch's default.

    An explicit `cpu_threads` wins, and a set `OMP_NUM_THREADS` is taken as the operator's own choice. Otherwise a
    CPU stage takes every usable core when the stages take turns (`compute_lock=on`), and its share of them
    (`cpu_stages` computing stage processes on the host) when they overlap.
    """
    if options.cpu_threads > 0:
        return options.cpu_threads
    environ = os.environ if env is None else env
    if not str(device).startswith("cpu") or environ.get("OMP_NUM_THREADS"):
        return None
    usable = available_cores() if cores is None else cores
    if options.compute_lock == "on":
        # torch's own default counts physical cores; affinity counts hyperthreads too.
        return min(usable, torch_default) if torch_default else usable
    return _fair_share(options, usable)


def _fair_share(options: ServerOptions, usable: int) -> int:
    # One thread each is the least there is, however many stage processes share the cores.
    return max(1, usable // options.cpu_stages)


def oversubscription(options: ServerOptions, device: str, threads: int, *, cores: int | None = None) -> str | None:
    """Why the stages' threads will exceed the cores while they overlap, or None."""
    if not str(device).startswith("cpu") or options.compute_lock == "on":
        return None
    usable = available_cores() if cores is None else cores
    if threads <= _fair_share(options, usable):
        return None
    cause = (f"BLIP2_CPU_THREADS={options.cpu_threads}" if options.cpu_threads
             else f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}")
    return (f"{options.cpu_stages} stage processes x {threads} torch threads ({cause}) on {usable} cores: the "
            "stages overlap (compute_lock is not on) and will oversubscribe the cores; lower it, or set "
            "BLIP2_COMPUTE_LOCK=on")
