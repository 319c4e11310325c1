"""The stub watchdog, the drain controller and the wrapper CLI, without Triton: a fake /proc for the parsing,
real child processes named like Triton's stubs, and a fake tritonserver for the wrapper."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blip2_triton import watchdog as wd
from blip2_triton.launcher import free_port

# --- /proc parsing ------------------------------------------------------------------------------------------


def fake_process(proc: Path, pid: int, ppid: int, argv: list[str], state: str = "S", start: int = 1000,
                 comm: str = "x", ticks: tuple[int, int] = (0, 0)) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    # stat(5): pid (comm) state ppid ... utime(14) stime(15) ... starttime(22)
    rest = [state, str(ppid)] + ["0"] * 9 + [str(ticks[0]), str(ticks[1])] + ["0"] * 6 + [str(start)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(rest) + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + (b"\0" if argv else b""))
    (d / "comm").write_text(comm + "\n")


def stub_argv(instance: str, region: str = "triton_python_backend_shm_region_1") -> list[str]:
    return ["/opt/tritonserver/backends/python/triton_python_backend_stub", "/models/m/1/model.py", region,
            "1048576", "1048576", "100", "/opt/tritonserver/backends/python", "336", instance, "DEFAULT"]


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    fake_process(root, 100, 1, ["tritonserver", "--model-repository=/m"], comm="tritonserver")
    fake_process(root, 101, 100, stub_argv("blip2_vision_0_0"), comm="triton_python_b")
    fake_process(root, 102, 100, stub_argv("blip2_llm_0_0", "triton_python_backend_shm_region_2"),
                 comm="triton_python_b")
    fake_process(root, 103, 1, stub_argv("other_server_0_0"), comm="triton_python_b")
    fake_process(root, 104, 100, ["/bin/sh", "-c", "true"], comm="sh")
    (root / "self").mkdir()
    return root


def test_stat_parsing_survives_odd_command_names(tmp_path: Path) -> None:
    fake_process(tmp_path, 7, 1, ["x"], state="R", comm="a) (b c", ticks=(12, 30))
    assert wd.process_state(7, tmp_path) == "R"
    assert wd.cpu_ticks(7, tmp_path) == 42
    assert wd.process_state(8, tmp_path) is None
    assert wd.cpu_ticks(8, tmp_path) == 0


def test_stub_processes_are_the_server_children_running_the_stub(proc: Path) -> None:
    stubs = wd.stub_processes(100, proc)
    assert sorted(stubs) == [101, 102]
    assert stubs[101].instance == "blip2_vision_0_0"
    assert stubs[102].shm_region == "triton_python_backend_shm_region_2"
    # A stub run as a script sits behind its interpreter.
    fake_process(proc, 105, 100, ["/usr/bin/python3", *stub_argv("script_0_0")], comm="triton_python_b")
    assert wd.stub_processes(100, proc)[105].instance == "script_0_0"


def test_watchdog_reports_a_dead_zombie_or_replaced_stub(proc: Path) -> None:
    dog = wd.StubWatchdog(100, lambda _: None, proc=proc)
    dog.stubs = wd.stub_processes(100, proc)
    assert dog.check() is None
    fake_process(proc, 101, 100, [], state="Z", comm="triton_python_b")
    assert dog.check() == "stub process of model instance 'blip2_vision_0_0' (pid 101) died"

    dog.stubs = wd.stub_processes(100, proc)
    assert dog.stubs[101].instance == "unknown (already dead)", "an unreaped dead stub is still seen"

    fake_process(proc, 101, 100, stub_argv("blip2_vision_0_0"), comm="triton_python_b")
    dog.stubs = wd.stub_processes(100, proc)
    # Same pid, another process (start time differs): the stub died and its pid was reused.
    fake_process(proc, 101, 100, stub_argv("blip2_vision_0_0"), start=2000, comm="triton_python_b")
    assert "'blip2_vision_0_0' (pid 101) died" in (dog.check() or "")

    dog.stubs = wd.stub_processes(100, proc)
    for child in (proc / "102").iterdir():
        child.unlink()
    (proc / "102").rmdir()
    assert "'blip2_llm_0_0' (pid 102) died" in (dog.check() or "")


def test_watchdog_adopts_new_stubs_and_ignores_a_gone_server(proc: Path) -> None:
    dog = wd.StubWatchdog(100, lambda _: None, proc=proc)
    dog.stubs = {}
    assert dog.check() is None
    assert sorted(dog.stubs) == [101, 102]
    fake_process(proc, 100, 1, [], state="Z", comm="tritonserver")
    dog.stubs = {}
    assert dog.check() is None and dog.stubs == {}


def test_remove_shm_regions_only_touches_plain_names(tmp_path: Path) -> None:
    (tmp_path / "triton_python_backend_shm_region_1").write_bytes(b"x")
    (tmp_path / "keep").write_bytes(b"x")
    stubs = [wd.Stub(1, 0, "a", "triton_python_backend_shm_region_1"), wd.Stub(2, 0, "b", "../keep"),
             wd.Stub(3, 0, "c", None), wd.Stub(4, 0, "d", "triton_python_backend_shm_region_gone")]
    wd.remove_shm_regions(stubs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


# --- real processes -----------------------------------------------------------------------------------------

FAKE_STUB = "#!{python}\nimport time\ntime.sleep(600)\n"


@pytest.fixture
def stub_binary(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / wd.STUB_BINARY
    path.parent.mkdir()
    path.write_text(FAKE_STUB.format(python=sys.executable))
    path.chmod(0o755)
    return path


def spawn_stub(stub_binary: Path, instance: str) -> subprocess.Popen[bytes]:
    args = ["model.py", "triton_python_backend_shm_region_t", "1", "1", str(os.getpid()), "/b", "336", instance,
            "DEFAULT"]
    return subprocess.Popen([str(stub_binary), *args])


def test_watchdog_sees_a_real_stub_killed(stub_binary: Path) -> None:
    child = spawn_stub(stub_binary, "real_0_0")
    try:
        deadline = time.monotonic() + 10
        while child.pid not in wd.stub_processes(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        faults: list[str] = []
        dog = wd.StubWatchdog(os.getpid(), faults.append, interval_s=0.05)
        dog.start()
        assert dog.stubs[child.pid].instance == "real_0_0"
        killed = time.monotonic()
        child.kill()
        while not faults and time.monotonic() - killed < 5:
            time.sleep(0.01)
        dog.stop()
        assert faults == [f"stub process of model instance 'real_0_0' (pid {child.pid}) died"]
        assert time.monotonic() - killed < 1.0
    finally:
        child.kill()
        child.wait()


# --- drain ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_drain_monitor_waits_for_quiet() -> None:
    clock = Clock()
    state = {"pending": 0, "done": 0}
    monitor = wd.DrainMonitor(lambda: [], lambda: state["pending"], lambda: state["done"], quiet_s=1.0, clock=clock)
    assert not monitor.idle(), "the first sample has nothing to compare with"
    for step in range(1, 12):
        clock.now = step * 0.1
        idle = monitor.idle()
        assert idle == (step >= 10), step
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


def test_drain_monitor_counts_stub_cpu_as_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    ticks = {"n": 0}
    monkeypatch.setattr(wd, "cpu_ticks", lambda pid, proc=wd.PROC: ticks["n"])
    monitor = wd.DrainMonitor(lambda: [1], lambda: None, lambda: None, quiet_s=0.5, clock=clock)
    monitor.idle()
    for _ in range(10):
        clock.now += 0.1
        ticks["n"] += 10  # one core busy: 100 ticks/s
        assert not monitor.idle()
    for _ in range(6):
        clock.now += 0.1
        monitor.idle()
    assert monitor.idle()


def test_endpoints_from_tritonserver_args() -> None:
    ep = wd.endpoints_from_args(["tritonserver", "--http-port=9000", "--metrics-port", "9002",
                                 "--http-address=0.0.0.0"])
    assert ep == wd.Endpoints(("127.0.0.1", 9000), "http://127.0.0.1:9002/metrics")
    ep = wd.endpoints_from_args(["tritonserver", "--allow-http=false", "--allow-metrics=false"])
    assert ep == wd.Endpoints(None, None)
    assert wd.endpoints_from_args(["t", "--http-address=10.0.0.5"]).http == ("10.0.0.5", 8000)
    assert wd.exit_timeout_from_args(["t", "--exit-timeout-secs=12"]) == 12
    assert wd.exit_timeout_from_args(["t"]) == 30


# --- wrapper CLI against a fake tritonserver ----------------------------------------------------------------

FAKE_SERVER = textwrap.dedent('''
    import http.server, json, os, signal, subprocess, sys, threading, time

    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    exit_code = int(os.environ.get("FAKE_EXIT_CODE", "0"))
    stub = subprocess.Popen([os.environ["FAKE_STUB"], "model.py", "triton_python_backend_shm_region_f", "1", "1",
                             str(os.getpid()), "/b", "336", "fake_vision_0_0", "DEFAULT"])

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = json.dumps({"model_stats": []}).encode() if "stats" in self.path else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(args["http-port"])), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    print("fake tritonserver up", flush=True)
    if os.environ.get("FAKE_EXIT_AFTER"):
        stop.wait(float(os.environ["FAKE_EXIT_AFTER"]))
    else:
        stop.wait()
    stub.kill()
    stub.wait()
    sys.exit(exit_code)
''')


@pytest.fixture
def fake_server(tmp_path: Path, stub_binary: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    path = tmp_path / "tritonserver"
    path.write_text(f"#!{sys.executable}\n" + FAKE_SERVER)
    path.chmod(0o755)
    yield path, {**os.environ, "FAKE_STUB": str(stub_binary)}


def run_wrapper(fake: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "blip2_triton.watchdog", "--interval-s", "0.1", "--drain-quiet-s", "0.3", "--",
           str(fake), f"--http-port={port}", "--allow-metrics=false", "--exit-timeout-secs=10"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE), port


def wait_armed(proc: subprocess.Popen[bytes]) -> list[wd.Stub]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        servers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                   and (wd._stat_fields(int(p.name)) or ["", "0"])[1] == str(proc.pid)]
        stubs = [s for pid in servers for s in wd.stub_processes(pid).values()]
        if stubs:
            # The wrapper arms once the server answers ready; give it a poll interval or two.
            time.sleep(1.5)
            return stubs
        assert proc.poll() is None
        time.sleep(0.1)
    raise AssertionError("fake server never started its stub")


def test_wrapper_exits_70_when_a_stub_dies(fake_server: tuple[Path, dict[str, str]]) -> None:
    fake, env = fake_server
    proc, _ = run_wrapper(fake, env)
    try:
        (stub,) = wait_armed(proc)
        os.kill(stub.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == wd.FAULT_EXIT_CODE
        assert b"'fake_vision_0_0'" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


def test_wrapper_forwards_sigterm_and_drains(fake_server: tuple[Path, dict[str, str]]) -> None:
    fake, env = fake_server
    proc, _ = run_wrapper(fake, env)
    try:
        wait_armed(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert b"draining in-flight requests" in proc.stderr.read()  # type: ignore[union-attr]
        assert b"fake tritonserver up" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


def test_wrapper_passes_the_server_exit_status_through(fake_server: tuple[Path, dict[str, str]]) -> None:
    fake, env = fake_server
    proc, _ = run_wrapper(fake, {**env, "FAKE_EXIT_AFTER": "0.5", "FAKE_EXIT_CODE": "3"})
    assert proc.wait(timeout=20) == 3


def test_wrapper_needs_a_command() -> None:
    with pytest.raises(SystemExit):
        wd.main([])


def test_a_fault_report_about_a_replaced_server_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # After a crash and a restart, the old server's watchdog may still report its stubs' exit.
    from blip2_triton import launcher

    killed: list[object] = []
    monkeypatch.setattr(launcher, "kill_server", lambda proc, stubs: killed.append(proc))
    server = launcher.TritonServer()
    old, new = object(), object()
    server.process = new  # type: ignore[assignment]
    server._on_fault(old, "stub 'blip2_vision_0_0' died")  # type: ignore[arg-type]
    assert killed == [] and server.fault is None and not server.fault_event.is_set()
    server._on_fault(new, "stub 'blip2_llm_0_0' died")  # type: ignore[arg-type]
    assert killed == [new] and server.fault == "stub 'blip2_llm_0_0' died" and server.fault_event.is_set()


def test_a_server_killed_past_its_exit_timeout_takes_its_stubs_with_it(stub_binary: Path) -> None:
    # A server that ignores SIGTERM (stuck in shutdown) and a stub that would outlive it (stuck in a CUDA call).
    server_code = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        import os
        subprocess.Popen([{str(stub_binary)!r}, "model.py", "triton_python_backend_shm_region_t", "1", "1",
                          str(os.getpid()), "/b", "336", "stuck_0_0", "DEFAULT"])
        print("up", flush=True)
        time.sleep(600)
    """)
    server = subprocess.Popen([sys.executable, "-c", server_code], stdout=subprocess.PIPE)
    stubs: dict[int, wd.Stub] = {}
    try:
        assert server.stdout is not None and server.stdout.readline() == b"up\n"
        deadline = time.monotonic() + 10
        while not (stubs := wd.stub_processes(server.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        (stub_pid,) = stubs
        code = wd.drain_and_stop(server, wd.Endpoints(None, None), exit_timeout_s=0.3, kill_after_s=0.3)
        assert code == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while wd.stub_is_alive(stubs[stub_pid]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not wd.stub_is_alive(stubs[stub_pid]), "the stuck stub outlived its killed server"
    finally:
        server.kill()
        server.wait()
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- parent death -------------------------------------------------------------------------------------------


def test_a_child_is_signalled_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    # A middle process (standing in for the launcher or the wrapper) starts a long sleep armed with
    # end_with_parent, reports the sleeper's pid, and is then SIGKILLed: the sleeper must end with it.
    pid_file = tmp_path / "child.pid"
    child: wd.Stub | None = None
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from blip2_triton.watchdog import end_with_parent
        arm = end_with_parent()
        assert arm is not None
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=arm)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert middle.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        fields = wd._stat_fields(pid)
        assert fields is not None
        child = wd.Stub(pid, wd._start_ticks(fields), "sleeper", None)
        assert wd.stub_is_alive(child)
        middle.kill()
        middle.wait(timeout=10)
        deadline = time.monotonic() + 10
        while wd.stub_is_alive(child):
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
            time.sleep(0.05)
    finally:
        middle.kill()
        middle.wait(timeout=10)
        if child is not None and wd.stub_is_alive(child):
            os.kill(child.pid, signal.SIGKILL)


def test_parent_death_signal_is_armed_only_from_the_main_thread() -> None:
    # Linux sends it when the forking thread ends: a server started from a short-lived thread would be killed.
    import threading

    assert callable(wd.end_with_parent())
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(wd.end_with_parent()))
    worker.start()
    worker.join()
    assert seen == [None]
