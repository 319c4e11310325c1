"""Faults against real tritonservers of their own (destructive, so not the session server): a stage's stub
process killed with SIGKILL, and SIGTERM while requests are in flight."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from blip2_client import Blip2Client, ServerUnavailableError
from triton_helpers import Clients, start_server, tritonserver_children

from blip2_triton.supervisor import free_port
from blip2_triton.supervisor.processes import kill_server, running, stub_processes
from blip2_triton.supervisor.watchdog import StubWatchdog

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VQA = "Question: what is in the picture? Answer:"
# The watchdog polls every 0.5 s; killing the server and its stubs takes a moment more on a loaded machine.
DETECTION_BUDGET_S = 3.0


def http_status(url: str, timeout_s: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def gone(pid: int) -> bool:
    # Exited; a zombie waiting for its new parent to reap it counts.
    return not running(pid)


def stub_of(server_pid: int, model: str) -> Any:
    stubs = [s for s in stub_processes(server_pid).values() if s.instance.startswith(f"{model}_")]
    assert len(stubs) == 1, stubs
    return stubs[0]


def test_dead_stub_is_unavailable_to_clients_and_caught_by_the_watchdog(
    tiny_model_dir: Path, server_log_dir: Path, sample_images: dict[str, bytes]
) -> None:
    # Without the watchdog this is plain Triton 2.51: the replica keeps saying ready while every request fails.
    server = start_server(server_log_dir, "dead-stub", model_id=str(tiny_model_dir), watchdog=False)
    try:
        assert server.process is not None
        stub = stub_of(server.process.pid, "blip2_vision")
        # Armed but only recording: the test looks at the unguarded server first.
        faults: list[tuple[float, str]] = []
        watchdog = StubWatchdog(server.process.pid, lambda reason: faults.append((time.monotonic(), reason)))
        watchdog.start()
        killed = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)
        time.sleep(0.5)
        with Blip2Client(server.grpc_url, protocol="grpc") as client, pytest.raises(ServerUnavailableError) as e:
            client.caption(sample_images["bmp"], max_tokens=4)
        assert "blip2_vision_0" in e.value.message and "not healthy" in e.value.message
        with Blip2Client(server.http_url, protocol="http") as client, pytest.raises(ServerUnavailableError):
            client.caption(sample_images["bmp"], max_tokens=4)
        assert http_status(f"{server.http_url}/v2/health/ready") == 200, "Triton itself still reports ready"

        watchdog.stop()
        assert faults and "'blip2_vision_0_0'" in faults[0][1]
        assert faults[0][0] - killed < DETECTION_BUDGET_S
        kill_server(server.process, list(watchdog.stubs.values()))
        assert http_status(f"{server.http_url}/v2/health/ready") == 0
        assert not stub_processes(server.process.pid)
    finally:
        server.stop()


def _serve(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    cmd = [sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1",
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), "--exit-timeout-secs", "10", *args]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, ports


def _wait_for_log(proc: subprocess.Popen[bytes], log: Path, text: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count(text) >= count:
            return
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    pytest.fail(f"{text!r} x{count} not in the log after {timeout_s:.0f} s:\n{tail}")


def _tritonserver_child(pid: int) -> int:
    children = tritonserver_children(pid)
    assert children, "no tritonserver child"
    return children[0]


def test_supervisor_restarts_the_replica_after_a_stub_dies(
    tiny_model_dir: Path, tmp_path: Path, sample_images: dict[str, bytes], reference: Any
) -> None:
    log = tmp_path / "serve.log"
    proc, ports = _serve(["--model-id", str(tiny_model_dir), "--max-restarts", "2"], log)
    ready_url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
    try:
        _wait_for_log(proc, log, "blip2-triton: ready", 1, 300)
        triton = _tritonserver_child(proc.pid)
        stubs = stub_processes(triton)
        stub = stub_of(triton, "blip2_vision")
        regions = [s.shm_region for s in stubs.values() if s.shm_region]
        assert regions and all((Path("/dev/shm") / r).exists() for r in regions)
        # Region names repeat in the restarted server, so "removed" means: gone, or a different file now.
        inodes = {r: (Path("/dev/shm") / r).stat().st_ino for r in regions}

        def old_region_left(region: str) -> bool:
            try:
                return (Path("/dev/shm") / region).stat().st_ino == inodes[region]
            except FileNotFoundError:
                return False

        killed = time.monotonic()
        os.kill(stub.pid, signal.SIGKILL)
        while http_status(ready_url, timeout_s=0.5) == 200:
            assert time.monotonic() - killed < DETECTION_BUDGET_S, "the replica still reports ready"
            time.sleep(0.05)
        detection_s = time.monotonic() - killed
        print(f"stub death -> readiness gone in {detection_s:.2f} s")
        # The broken server and its other stubs are gone, with their shared-memory regions.
        deadline = time.monotonic() + 5

        def cleaned() -> bool:
            # The watchdog unlinks the regions right after the processes exit: wait for both.
            processes_gone = all(gone(pid) for pid in (triton, *stubs))
            return processes_gone and not any(old_region_left(r) for r in regions)

        while not cleaned() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in (triton, *stubs))
        assert not any(old_region_left(r) for r in regions)

        _wait_for_log(proc, log, "blip2-triton: ready", 2, 300)
        text = log.read_text()
        assert "stub process of model instance 'blip2_vision_0_0'" in text
        assert "restarting tritonserver (1/2" in text
        data = sample_images["rgb_jpeg"]
        with Blip2Client(f"127.0.0.1:{ports['grpc']}", protocol="grpc") as client:
            assert client.caption(data, max_tokens=9) == reference(data, None, 9)
            assert client.ask(data, "what is in the picture?", max_tokens=7) == reference(data, VQA, 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]


def test_a_crashed_server_leaves_no_stub_behind_and_restarts_alone(
    tiny_model_dir: Path, tmp_path: Path, sample_images: dict[str, bytes], reference: Any
) -> None:
    # Triton 2.51 can abort (its sync.cc assertion on a mass stream cancel, issue #7368); a stub that is busy or
    # stopped then outlives it, holding its memory, while a restart would start a second server beside it.
    log = tmp_path / "serve.log"
    proc, ports = _serve(["--model-id", str(tiny_model_dir), "--max-restarts", "1"], log)
    stubs: dict[int, Any] = {}
    try:
        _wait_for_log(proc, log, "blip2-triton: ready", 1, 300)
        triton = _tritonserver_child(proc.pid)
        stubs = stub_processes(triton)
        llm = stub_of(triton, "blip2_llm")
        assert llm.shm_region and (Path("/dev/shm") / llm.shm_region).exists()
        inode = (Path("/dev/shm") / llm.shm_region).stat().st_ino
        os.kill(llm.pid, signal.SIGSTOP)  # it cannot notice its parent's death
        os.kill(triton, signal.SIGKILL)
        _wait_for_log(proc, log, "blip2-triton: ready", 2, 300)
        assert all(not stub.alive() for stub in stubs.values()), "a stub of the crashed server still runs"
        region = Path("/dev/shm") / llm.shm_region
        assert not region.exists() or region.stat().st_ino != inode
        data = sample_images["rgb_jpeg"]
        with Blip2Client(f"127.0.0.1:{ports['grpc']}", protocol="grpc") as client:
            assert client.caption(data, max_tokens=5) == reference(data, None, 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        for stub in stubs.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub.pid, signal.SIGKILL)
    assert code == 0, log.read_text()[-3000:]


def test_a_paused_stage_makes_the_replica_unready_and_it_recovers_without_a_restart(
    tiny_model_dir: Path, tmp_path: Path, sample_images: dict[str, bytes], reference: Any
) -> None:
    # Triton 2.51 says ready while a stage is stopped, and a request reaching it makes Triton give the stage up for
    # good. The front answers unready at once and turns inference away (retryable) until the stage resumes.
    log = tmp_path / "serve.log"
    proc, ports = _serve(["--model-id", str(tiny_model_dir), "--max-restarts", "1"], log)
    ready_url = f"http://127.0.0.1:{ports['http']}/v2/health/ready"
    data = sample_images["rgb_jpeg"]
    try:
        _wait_for_log(proc, log, "blip2-triton: ready", 1, 300)
        vision = stub_of(_tritonserver_child(proc.pid), "blip2_vision")
        os.kill(vision.pid, signal.SIGSTOP)
        try:
            paused = time.monotonic()
            while http_status(ready_url, timeout_s=0.5) == 200:
                assert time.monotonic() - paused < DETECTION_BUDGET_S, "the replica still reports ready"
                time.sleep(0.05)
            print(f"stage paused -> readiness gone in {time.monotonic() - paused:.2f} s")
            with (Blip2Client(f"127.0.0.1:{ports['grpc']}", protocol="grpc", timeout_s=10) as client,
                  pytest.raises(ServerUnavailableError, match="not ready")):
                client.caption(data, max_tokens=5)
        finally:
            os.kill(vision.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while http_status(ready_url, timeout_s=0.5) != 200:
            assert time.monotonic() < deadline, "the replica did not come back"
            time.sleep(0.05)
        with Blip2Client(f"127.0.0.1:{ports['grpc']}", protocol="grpc") as client:
            assert client.caption(data, max_tokens=5) == reference(data, None, 5)
        assert vision.alive() and "restarting tritonserver" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]


# --- SIGTERM under load -----------------------------------------------------------------------------------

BUSY_MODEL = '''
import importlib.util, os, time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_blip2_stage", Path(__file__).with_name("stage_model.py"))
_stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_stage)


class TritonPythonModel(_stage.TritonPythonModel):
    def execute(self, requests):
        # Burns CPU like a real vision batch on a big checkpoint would, so requests stay in flight for a while.
        end = time.monotonic() + float(os.environ.get("ROBUSTNESS_TEST_VISION_BUSY_S", "0"))
        while time.monotonic() < end:
            pass
        return super().execute(requests)
'''


@pytest.fixture
def busy_repository(tmp_path: Path) -> Iterator[Path]:
    repo = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    vision = repo / "blip2_vision" / "1"
    (vision / "model.py").rename(vision / "stage_model.py")
    (vision / "model.py").write_text(BUSY_MODEL)
    yield repo


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    busy_repository: Path, tiny_model_dir: Path, server_log_dir: Path, sample_images: dict[str, bytes],
    reference: Any,
) -> None:
    server = start_server(server_log_dir, "drain", model_repository=busy_repository, model_id=str(tiny_model_dir),
                          env={"ROBUSTNESS_TEST_VISION_BUSY_S": "1.5"})
    exit_timeout = server.settings.exit_timeout_s
    data = sample_images["rgb_jpeg"]
    jobs = [(protocol, prompt) for protocol in ("grpc", "http") for prompt in (None, VQA) for _ in range(2)]
    clients = {p: Clients(p, server) for p in ("grpc", "http")}
    try:
        with ThreadPoolExecutor(max_workers=len(jobs) + 2) as pool:
            in_flight = [pool.submit(clients[p].infer, data, prompt, max_tokens=12) for p, prompt in jobs]
            # They are queued in or executing the busy vision stage now.
            time.sleep(0.7)
            assert not any(f.done() for f in in_flight)
            stopped: dict[str, Any] = {}

            def stop() -> None:
                started = time.monotonic()
                stopped["code"] = server.stop()
                stopped["seconds"] = time.monotonic() - started

            stopper = threading.Thread(target=stop)
            stopper.start()
            time.sleep(0.5)
            # New HTTP connections are refused at once: readiness probes and HTTP clients see the replica gone.
            assert http_status(f"{server.http_url}/v2/health/ready") != 200
            with Blip2Client(server.http_url, protocol="http") as client, pytest.raises(ServerUnavailableError):
                client.caption(data, max_tokens=3)
            # gRPC requests arriving during the drain are still served (Triton 2.51 cannot refuse them while
            # keeping ensembles in flight) or, once the drain is over, refused as unavailable.
            late = pool.submit(clients["grpc"].infer, data, None, max_tokens=5)
            results = [f.result(timeout=60) for f in in_flight]
            stopper.join(timeout=exit_timeout + 30)
            try:
                assert late.result(timeout=60) == reference(data, None, 5)
            except Exception as e:
                assert "Server is stopping" in str(e) or "unavailable" in str(e).lower(), e
    finally:
        for c in clients.values():
            c.close()
        server.stop()
    print(f"drain: {len(jobs)} in-flight requests completed, server stopped in {stopped['seconds']:.1f} s "
          f"(exit timeout {exit_timeout} s)")
    assert results == [reference(data, prompt, 12) for _, prompt in jobs]
    assert stopped["code"] == 0
    assert stopped["seconds"] < exit_timeout


def test_ctrl_c_drains_in_flight_requests(
    busy_repository: Path, tiny_model_dir: Path, tmp_path: Path, sample_images: dict[str, bytes], reference: Any,
) -> None:
    # Ctrl-C signals the terminal's whole process group. tritonserver must not get it directly: it would stop its
    # models at once instead of letting the launcher drain them.
    log = tmp_path / "serve.log"
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1",
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
         "--exit-timeout-secs", "20", "--model-repository", str(busy_repository), "--model-id", str(tiny_model_dir)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "ROBUSTNESS_TEST_VISION_BUSY_S": "1.5"},
    )
    data = sample_images["rgb_jpeg"]
    try:
        _wait_for_log(proc, log, "blip2-triton: ready", 1, 300)
        with Blip2Client(f"127.0.0.1:{ports['grpc']}", protocol="grpc") as client, \
                ThreadPoolExecutor(max_workers=4) as pool:
            in_flight = [pool.submit(client.caption, data, max_tokens=8) for _ in range(4)]
            time.sleep(0.7)  # queued in or executing the busy vision stage
            assert not any(f.done() for f in in_flight)
            os.killpg(proc.pid, signal.SIGINT)
            results = [f.result(timeout=60) for f in in_flight]
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert results == [reference(data, None, 8)] * 4
    assert "draining in-flight requests" in log.read_text()
