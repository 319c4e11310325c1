"""One model forward pass at a time across the stage processes of a CPU host.

On CPU the vision and LLM stage processes each run torch with one thread per core. When both compute at once the
cores are oversubscribed twice over and OpenMP's spinning threads slow both down far more than taking turns
would (measured on 2 cores: the vision stage took 127 ms per image served next to the LLM engine, 45-53 ms
alone). Taking turns keeps each forward pass on all cores, the way an in-process pipeline runs. On a GPU the
stages should overlap, so `auto` turns this on only for CPU devices.

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
    def for_stage(cls, setting: str, device: str, lock_file: str = "") -> ComputeLock:
        """`setting` is on/off/auto (auto: on for CPU devices)."""
        enabled = setting == "on" or (setting == "auto" and str(device).startswith("cpu"))
        if not enabled:
            return cls(None)
        path = Path(lock_file) if lock_file else default_lock_file()
        try:
            lock = cls(path)
            log.info("compute lock on: forward passes take turns with the host's other stages (%s)", path)
            return lock
        except OSError as e:
            # A read-only or missing temp dir must not stop the server; it only loses the CPU scheduling gain.
            log.warning("compute lock disabled: cannot open %s (%s)", path, e)
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
