"""The supervisor without Triton: process inspection and the stub watchdog on real child processes named like
Triton's stubs, the drain monitor on a fake clock, and the supervision loop (container entrypoint and
`blip2-triton serve`) around a fake tritonserver."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from fake_triton import Supervised, fake_install

from blip2_triton.supervisor import FAULT_EXIT_CODE, TritonServer, free_port, server
from blip2_triton.supervisor.drain import DrainMonitor, Endpoints, drain_and_stop
from blip2_triton.supervisor.processes import (
    STUB_BINARY,
    Stub,
    end_stubs,
    end_with_parent,
    remove_shm_regions,
    running,
    stub_processes,
)
from blip2_triton.supervisor.watchdog import StubWatchdog

SLEEP = "import time\ntime.sleep(600)\n"


def wait_until(predicate: Callable[[], object], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class Stubs:
    """Child processes of this test named like Triton's stubs: the binary form (here the interpreter under the
    stub's name, its first argument the model file), or a script behind its interpreter."""

    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "model.py").write_text(SLEEP)
        (tmp_path / "script").mkdir()
        (tmp_path / "script" / STUB_BINARY).write_text(SLEEP)
        self.binary = tmp_path / STUB_BINARY
        self.binary.symlink_to(Path(sys.executable).resolve())
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, instance: str, *, script: bool = False) -> subprocess.Popen[bytes]:
        # argv: stub model.py shm_region shm_default shm_growth parent_pid backend_dir ipc_size instance kind
        args = [f"triton_python_backend_shm_region_{instance}", "1", "1", str(os.getpid()), "/b", "336", instance,
                "DEFAULT"]
        if script:
            argv = [sys.executable, str(self.tmp_path / "script" / STUB_BINARY), "model.py", *args]
        else:
            argv = [str(self.binary), str(self.tmp_path / "model.py"), *args]
        child = subprocess.Popen(argv)
        self.started.append(child)
        wait_until(lambda: child.pid in stub_processes(os.getpid()))
        return child

    def seen(self) -> dict[int, Stub]:
        pids = {c.pid for c in self.started}
        return {pid: s for pid, s in stub_processes(os.getpid()).items() if pid in pids}

    def close(self) -> None:
        for child in self.started:
            child.kill()
            child.wait()


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[Stubs]:
    spawned = Stubs(tmp_path)
    yield spawned
    spawned.close()


# --- process inspection and the watchdog --------------------------------------------------------------------


def test_stub_processes_are_the_server_children_running_the_stub(stubs: Stubs) -> None:
    binary, script = stubs.spawn("blip2_vision_0_0"), stubs.spawn("script_0_0", script=True)
    other = subprocess.Popen([sys.executable, "-c", SLEEP])
    try:
        time.sleep(0.2)
        found = stub_processes(os.getpid())
        assert other.pid not in found
        assert {pid: (s.instance, s.shm_region) for pid, s in stubs.seen().items()} == {
            binary.pid: ("blip2_vision_0_0", "triton_python_backend_shm_region_blip2_vision_0_0"),
            script.pid: ("script_0_0", "triton_python_backend_shm_region_script_0_0"),
        }
    finally:
        other.kill()
        other.wait()
    assert stub_processes(other.pid) == {}, "a gone server has no stubs"


def test_watchdog_keeps_a_live_stub_when_the_wall_clock_moves(stubs: Stubs, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel recomputes the boot time when the clock is adjusted, which moves every wall-clock create time;
    # a served bench once lost its server to that.
    stub = stubs.spawn("blip2_stream_0_5")
    dog = StubWatchdog(os.getpid(), lambda _: None)
    dog.stubs = stubs.seen()
    stub_started = psutil.Process(stub.pid).create_time()
    boot = psutil.boot_time()
    monkeypatch.setattr("psutil._pslinux.boot_time", lambda: boot + 1.0)
    assert abs(psutil.Process(stub.pid).create_time() - stub_started) > 0.5
    assert dog.check() is None


def test_watchdog_reports_a_dead_zombie_or_replaced_stub(stubs: Stubs) -> None:
    vision, llm = stubs.spawn("blip2_vision_0_0"), stubs.spawn("blip2_llm_0_0")
    dog = StubWatchdog(os.getpid(), lambda _: None)
    dog.stubs = stubs.seen()
    assert dog.check() is None
    # Killed and not yet reaped: a zombie, and still seen as a (dead) stub.
    vision.kill()
    wait_until(lambda: psutil.Process(vision.pid).status() == psutil.STATUS_ZOMBIE)
    assert dog.check() == f"stub process of model instance 'blip2_vision_0_0' (pid {vision.pid}) died"
    assert stubs.seen()[vision.pid].instance == "unknown (already dead)"
    vision.wait()
    # Same pid, another process (its create time differs): the stub died and its pid was reused.
    record = stubs.seen()[llm.pid]
    dog.stubs = {llm.pid: Stub(llm.pid, record.created - 1, record.instance, None)}
    assert f"'blip2_llm_0_0' (pid {llm.pid}) died" in (dog.check() or "")
    dog.stubs = {llm.pid: record}
    llm.kill()
    llm.wait()
    assert f"'blip2_llm_0_0' (pid {llm.pid}) died" in (dog.check() or "")


def test_watchdog_adopts_new_stubs_and_ignores_a_gone_server(stubs: Stubs) -> None:
    child = stubs.spawn("late_0_0")
    dog = StubWatchdog(os.getpid(), lambda _: None)
    assert dog.check() is None and child.pid in dog.stubs
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not running(gone.pid)
    dog = StubWatchdog(gone.pid, lambda _: None)
    assert dog.check() is None and dog.stubs == {}


def test_watchdog_sees_a_real_stub_killed(stubs: Stubs) -> None:
    child = stubs.spawn("real_0_0")
    faults: list[str] = []
    dog = StubWatchdog(os.getpid(), faults.append, interval_s=0.05).start()
    try:
        assert dog.stubs[child.pid].instance == "real_0_0"
        child.kill()
        wait_until(lambda: faults, timeout_s=5)
    finally:
        dog.stop()
    assert faults == [f"stub process of model instance 'real_0_0' (pid {child.pid}) died"]


def test_watchdog_marks_a_paused_stub_unhealthy_until_it_resumes(stubs: Stubs) -> None:
    child = stubs.spawn("blip2_vision_0_0")
    dog = StubWatchdog(os.getpid(), lambda _: None)
    dog.stubs = stubs.seen()
    assert dog.check() is None and dog.healthy
    os.kill(child.pid, signal.SIGSTOP)
    wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_STOPPED)
    assert dog.check() is None, "a paused stub is not (yet) a dead one"
    assert not dog.healthy and dog.paused == {"blip2_vision_0_0"}
    os.kill(child.pid, signal.SIGCONT)
    wait_until(lambda: psutil.Process(child.pid).status() != psutil.STATUS_STOPPED)
    assert dog.check() is None and dog.healthy


def test_stubs_left_by_a_dead_server_are_ended_with_their_regions(stubs: Stubs, tmp_path: Path) -> None:
    # A stopped stub never notices its parent is gone: it must be killed, and its shm region removed.
    orphan = stubs.spawn("blip2_llm_0_0")
    os.kill(orphan.pid, signal.SIGSTOP)
    (record,) = stubs.seen().values()
    shm = tmp_path / "shm"
    shm.mkdir()
    (shm / record.shm_region).write_bytes(b"x")
    assert end_stubs([record], shm) == []
    assert not record.alive() and not any(shm.iterdir())


def test_remove_shm_regions_only_touches_plain_names(tmp_path: Path) -> None:
    (tmp_path / "triton_python_backend_shm_region_1").write_bytes(b"x")
    (tmp_path / "keep").write_bytes(b"x")
    records = [Stub(1, 0, "a", "triton_python_backend_shm_region_1"), Stub(2, 0, "b", "../keep"),
               Stub(3, 0, "c", None), Stub(4, 0, "d", "triton_python_backend_shm_region_gone")]
    remove_shm_regions(records, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_a_fault_report_about_a_replaced_server_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # After a crash and a restart, the old server's watchdog may still report its stubs' exit.
    killed: list[object] = []
    monkeypatch.setattr(server, "kill_server", lambda proc, stubs: killed.append(proc))
    triton = TritonServer()
    old, new = object(), object()
    triton.process = new  # type: ignore[assignment]
    triton._on_fault(old, "stub 'blip2_vision_0_0' died")  # type: ignore[arg-type]
    assert killed == [] and triton.fault is None and not triton.fault_event.is_set()
    triton._on_fault(new, "stub 'blip2_llm_0_0' died")  # type: ignore[arg-type]
    assert killed == [new] and triton.fault == "stub 'blip2_llm_0_0' died" and triton.fault_event.is_set()


def test_a_server_killed_past_its_exit_timeout_takes_its_stubs_with_it(tmp_path: Path) -> None:
    # A server that ignores SIGTERM (stuck in shutdown) and a stub that would outlive it (stuck in a CUDA call).
    stub = tmp_path / STUB_BINARY
    stub.write_text(f"#!{sys.executable}\n{SLEEP}")
    stub.chmod(0o755)
    server_code = textwrap.dedent(f"""
        import os, signal, subprocess, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([{str(stub)!r}, "model.py", "triton_python_backend_shm_region_t", "1", "1",
                          str(os.getpid()), "/b", "336", "stuck_0_0", "DEFAULT"])
        print("up", flush=True)
        time.sleep(600)
    """)
    triton = subprocess.Popen([sys.executable, "-c", server_code], stdout=subprocess.PIPE)
    found: dict[int, Stub] = {}
    try:
        assert triton.stdout is not None and triton.stdout.readline() == b"up\n"
        wait_until(lambda: found.update(stub_processes(triton.pid)) or found)
        code = drain_and_stop(triton, Endpoints(None, None), exit_timeout_s=0.3, kill_after_s=0.3)
        assert code == -signal.SIGKILL
        (record,) = found.values()
        wait_until(lambda: not record.alive(), timeout_s=5)
    finally:
        triton.kill()
        triton.wait()
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- drain ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_drain_monitor_waits_for_quiet() -> None:
    clock = Clock()
    state = {"pending": 0, "done": 0}
    monitor = DrainMonitor(lambda: 0.0, lambda: state["pending"], lambda: state["done"], quiet_s=1.0, clock=clock)
    assert not monitor.idle(), "the first sample has nothing to compare with"
    for step in range(1, 12):
        clock.now = step * 0.1
        assert monitor.idle() == (step >= 10), step
    # Queued work, then completions, each restart the quiet period.
    state["pending"] = 2
    clock.now += 0.1
    assert not monitor.idle()
    state["pending"] = 0
    state["done"] = 5
    clock.now += 0.1
    assert not monitor.idle()
    clock.now += 0.5
    assert not monitor.idle()
    clock.now += 0.6
    assert monitor.idle()


def test_drain_monitor_counts_stub_cpu_as_work() -> None:
    clock = Clock()
    cpu = {"s": 0.0}
    monitor = DrainMonitor(lambda: cpu["s"], lambda: None, lambda: None, quiet_s=0.5, clock=clock)
    monitor.idle()
    for _ in range(10):
        clock.now += 0.1
        cpu["s"] += 0.1  # one core busy
        assert not monitor.idle()
    for _ in range(6):
        clock.now += 0.1
        monitor.idle()
    assert monitor.idle()


# --- supervision around a fake tritonserver -------------------------------------------------------------------


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Runs docker/entrypoint.sh as the container does, its tritonserver the fake one on PATH."""
    _, env = fake_install(tmp_path)
    env["TRITON_HTTP_PORT"] = str(free_port())
    env["TRITON_METRICS_PORT"] = str(free_port())
    started: list[Supervised] = []

    def run(**extra_env: str) -> Supervised:
        started.append(Supervised.entrypoint({**env, **extra_env}, tmp_path / f"run{len(started)}.log"))
        return started[-1]

    yield run
    for supervised in started:
        supervised.close()


def fake_stub(supervisor_pid: int) -> Stub:
    (triton,) = [c for c in psutil.Process(supervisor_pid).children() if c.name() == "tritonserver"]
    (stub,) = stub_processes(triton.pid).values()
    return stub


def test_container_exits_70_when_a_stub_dies(container: Callable[..., Supervised]) -> None:
    run = container()
    run.wait_for("blip2-triton: ready")
    stub = fake_stub(run.proc.pid)
    os.kill(stub.pid, signal.SIGKILL)
    assert run.proc.wait(timeout=20) == FAULT_EXIT_CODE, run.text()
    assert "stub process of model instance 'fake_vision_0_0'" in run.text()


def test_container_drains_on_sigterm(container: Callable[..., Supervised]) -> None:
    run = container()
    run.wait_for("blip2-triton: ready")
    assert run.signal(signal.SIGTERM) == 0, run.text()
    assert "draining in-flight requests" in run.text() and "fake tritonserver up" in run.text()


def test_container_passes_the_server_exit_status_through(container: Callable[..., Supervised]) -> None:
    run = container(FAKE_EXIT_AFTER="1", FAKE_EXIT_CODE="3")
    assert run.proc.wait(timeout=30) == 3, run.text()
    assert "tritonserver exited with code 3" in run.text()


def test_container_without_watchdog_keeps_a_broken_server(container: Callable[..., Supervised]) -> None:
    run = container(BLIP2_WATCHDOG="0")
    run.wait_for("blip2-triton: ready")
    os.kill(fake_stub(run.proc.pid).pid, signal.SIGKILL)
    time.sleep(1.5)  # three watchdog polls, were it armed
    assert run.proc.poll() is None and "died" not in run.text()
    assert run.signal(signal.SIGTERM) == 0, run.text()


def test_serve_restarts_after_a_stub_death_within_its_budget(tmp_path: Path) -> None:
    _, env = fake_install(tmp_path)
    run = Supervised([sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1",
                      "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--max-restarts", "1"],
                     env, tmp_path / "serve.log")
    try:
        run.wait_for("blip2-triton: ready")
        os.kill(fake_stub(run.proc.pid).pid, signal.SIGKILL)
        run.wait_for("blip2-triton: ready", count=2)
        assert "restarting tritonserver (1/1 within 600 s)" in run.text()
        # The budget is spent: the next death ends the supervisor with the fault status.
        os.kill(fake_stub(run.proc.pid).pid, signal.SIGKILL)
        assert run.proc.wait(timeout=20) == FAULT_EXIT_CODE, run.text()
        assert "1 restarts within 600 s; giving up" in run.text()
    finally:
        run.close()


# --- parent death -------------------------------------------------------------------------------------------


def test_a_child_is_signalled_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    # A middle process (standing in for the supervisor) starts a long sleep armed with end_with_parent, reports the
    # sleeper's pid, and is then SIGKILLed: the sleeper must end with it.
    pid_file = tmp_path / "child.pid"
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from blip2_triton.supervisor.processes import end_with_parent
        arm = end_with_parent()
        assert arm is not None
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=arm)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)])
    child: psutil.Process | None = None
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), timeout_s=30)
        child = psutil.Process(int(pid_file.read_text()))
        middle.kill()
        middle.wait(timeout=10)
        wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE)
    finally:
        middle.kill()
        middle.wait(timeout=10)
        if child is not None and child.is_running():
            child.kill()


def test_parent_death_signal_is_armed_only_from_the_main_thread() -> None:
    # Linux sends it when the forking thread ends: a server started from a short-lived thread would be killed.
    import threading

    assert callable(end_with_parent())
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(end_with_parent()))
    worker.start()
    worker.join()
    assert seen == [None]
