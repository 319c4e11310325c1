"""Stub watchdog: Triton 2.51 keeps answering ready and live after a Python backend stub died while every request
to that model fails, so the supervisor ends such a server itself (docs/ROBUSTNESS.md, "A stage process dies")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .processes import Stub, running, stub_processes

log = logging.getLogger(__name__)


class StubWatchdog:
    """Polls the stubs of a running tritonserver; reports the first one that died through `on_fault`.

    Arm it once the server is ready: during model loading Triton starts and stops stubs on its own. It assumes a
    static model set (`--model-control-mode=none`): a stub stopped for a model unload would look like a death.
    """

    def __init__(self, server_pid: int, on_fault: Callable[[str], None], *, interval_s: float = 0.5) -> None:
        self.server_pid = server_pid
        self.on_fault = on_fault
        self.interval_s = interval_s
        self.stubs: dict[int, Stub] = {}
        # Instances of the stubs that are stopped (SIGSTOP, a debugger) as of the last poll.
        self.paused: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """One poll: a description of the first dead stub, else None (and newly started stubs are adopted)."""
        if not running(self.server_pid):
            # The server itself is gone (its stubs follow it); whoever waits on it reports that.
            return None
        for stub in list(self.stubs.values()):
            if not stub.alive():
                return f"stub process of model instance '{stub.instance}' (pid {stub.pid}) died"
        paused = {stub.instance for stub in self.stubs.values() if stub.paused()}
        if paused != self.paused:
            log.warning("watchdog: stub processes paused: %s", ", ".join(sorted(paused)) or "none")
        self.paused = paused
        for pid, stub in stub_processes(self.server_pid).items():
            self.stubs.setdefault(pid, stub)
        return None

    def start(self) -> StubWatchdog:
        self.stubs = stub_processes(self.server_pid)
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

    @property
    def healthy(self) -> bool:
        """No stub is paused: a paused one fails every request Triton routes to it (docs/ROBUSTNESS.md)."""
        return not self.paused

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
