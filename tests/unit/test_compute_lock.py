"""The cross-process compute lock that makes CPU stage processes take turns (`blip2_triton.compute_lock`)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from blip2_triton.compute_lock import ComputeLock
from blip2_triton.errors import ConfigurationError
from blip2_triton.options import ServerOptions


def _hold(path: str, started: mp.Event, release: mp.Event) -> None:
    with ComputeLock(Path(path)):
        started.set()
        release.wait(30)


def test_a_second_process_waits_for_the_holder(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "lock"), started, release))
    holder.start()
    try:
        assert started.wait(30)
        lock = ComputeLock(tmp_path / "lock")
        got = threading.Event()

        def take() -> None:
            with lock:
                got.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not got.wait(0.3), "the lock was taken while another process held it"
        release.set()
        assert got.wait(10)
        taker.join()
    finally:
        release.set()
        holder.join(10)


def test_threads_of_one_process_exclude_each_other_and_nesting_is_allowed(tmp_path: Path) -> None:
    lock = ComputeLock(tmp_path / "lock")
    inside = 0
    overlap = False

    def work() -> None:
        nonlocal inside, overlap
        for _ in range(50):
            with lock, lock:  # re-entrant on one thread (a static batch inside a step, ...)
                inside += 1
                overlap = overlap or inside > 1
                time.sleep(0.0005)
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap


def test_waiters_take_turns_with_a_tight_loop(tmp_path: Path) -> None:
    # The engine steps in a tight loop; without the entry lock it could re-take the lock before a waiter.
    looping, waiter = ComputeLock(tmp_path / "lock"), ComputeLock(tmp_path / "lock")
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with looping:
                time.sleep(0.002)

    t = threading.Thread(target=loop)
    t.start()
    try:
        waits = []
        for _ in range(20):
            t0 = time.monotonic()
            with waiter:
                waits.append(time.monotonic() - t0)
        assert max(waits) < 1.0, f"starved: waited up to {max(waits):.3f} s"
    finally:
        stop.set()
        t.join()


def test_auto_turns_it_on_for_cpu_only(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    assert ComputeLock.for_stage("auto", "cpu", path).enabled
    assert not ComputeLock.for_stage("auto", "cuda:0", path).enabled
    assert ComputeLock.for_stage("on", "cuda:0", path).enabled
    assert not ComputeLock.for_stage("off", "cpu", path).enabled
    with ComputeLock(None):  # disabled: a no-op context
        pass


def test_an_unusable_lock_file_disables_the_lock_instead_of_failing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    lock = ComputeLock.for_stage("on", "cpu", str(blocker / "lock"))  # a path below a regular file
    assert not lock.enabled


def test_option_is_validated_and_read_from_the_environment() -> None:
    assert ServerOptions.resolve({}, env={}).compute_lock == "auto"
    assert ServerOptions.resolve({}, env={"BLIP2_COMPUTE_LOCK": "off"}).compute_lock == "off"
    with pytest.raises(ConfigurationError, match="compute_lock must be one of auto, on, off"):
        ServerOptions.resolve({"compute_lock": "sometimes"}, env={})
