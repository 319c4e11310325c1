"""`blip2-triton serve` as users run it: no arguments (the embedded default, the trained scenes model; with `--t5`
also the generated tiny FlanT5) and --model-id DIR."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import tritonclient.http as httpclient
from images import encode
from triton_helpers import infer, tritonserver_children

from blip2_triton.checkpoint import tiny_dirname
from blip2_triton.scenes import HELD_OUT_SEED_START, make_scene, vqa_prompt
from blip2_triton.supervisor import free_port
from blip2_triton.supervisor.processes import SHM_DIR, running, stub_processes


def _serve(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, int]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [
        sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1",
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
        "--exit-timeout-secs", "5", *args,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if b"blip2-triton: ready" in log.read_bytes():
            return proc, http
        time.sleep(0.5)
    proc.kill()
    pytest.fail("blip2-triton serve did not become ready:\n" + log.read_text()[-3000:])


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_serve_without_arguments_serves_the_embedded_default(tmp_path: Path) -> None:
    # A fresh cache: the launcher must generate the tiny FlanT5 itself; the OPT default ships in the package.
    env = {**os.environ, "BLIP2_CACHE_DIR": str(tmp_path / "cache"), "BLIP2_T5_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("BLIP2_MODEL_ID", None)
    proc, http = _serve(["--t5"], env, tmp_path / "serve.log")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        scene = make_scene(HELD_OUT_SEED_START + 39)
        image = encode(scene.image, "PNG")
        assert infer(client, image, None, max_tokens=30) == scene.caption
        assert infer(client, image, vqa_prompt(scene.qa[0][0]), max_tokens=5) == scene.qa[0][1]
        assert client.is_model_ready("blip2_t5")
        infer(client, image, None, max_tokens=4, model="blip2_t5")  # answers (gibberish: random weights)
        # An open keep-alive connection would hold Triton's shutdown for the whole exit timeout.
        client.close()
        assert (tmp_path / "cache" / tiny_dirname("t5") / "model.safetensors").exists()
        assert not (tmp_path / "cache" / tiny_dirname("opt")).exists()
    finally:
        code = _stop(proc)
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert "stopping" in (tmp_path / "serve.log").read_text()


def test_serve_model_id_directory_and_sigkill(tmp_path: Path, tiny_model_dir: Path, sample_images,
                                              reference) -> None:
    env = {**os.environ, "BLIP2_CACHE_DIR": str(tmp_path / "unused-cache")}
    proc, http = _serve(["--model-id", str(tiny_model_dir)], env, tmp_path / "serve.log")
    watched: list[psutil.Process] = []
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        data = sample_images["cmyk_jpeg"]
        prompt = "Question: what color is the car? Answer:"
        assert infer(client, data, prompt, max_tokens=7) == reference(data, prompt, 7)
        client.close()
        (server,) = tritonserver_children(proc.pid)
        stubs = stub_processes(server)
        regions = [SHM_DIR / s.shm_region for s in stubs.values() if s.shm_region]
        assert stubs and regions and all(r.exists() for r in regions)
        # psutil remembers each one's create time: a pid reused by another process after ours ended is not ours.
        watched = [psutil.Process(pid) for pid in (server, *stubs)]
        # A launcher killed outright (OOM killer, kill -9) must not leave its server holding ports and memory.
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in watched):
            assert time.monotonic() < killed + 60, "tritonserver or a stub outlived the SIGKILLed launcher"
            time.sleep(0.2)
        print(f"tritonserver and {len(stubs)} stubs ended {time.monotonic() - killed:.1f} s after the launcher")
        assert not [r for r in regions if r.exists()], "shared-memory regions left behind"
    finally:
        if proc.poll() is None:
            _stop(proc)
        for p in watched:
            # Only after a failure: nothing else may be left running for the tests that follow.
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    text = (tmp_path / "serve.log").read_text()
    assert f"loaded {tiny_model_dir}" in text
    assert not (tmp_path / "unused-cache").exists()


def test_serve_reports_a_missing_checkpoint(tmp_path: Path) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    result = subprocess.run(
        [sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--model-id", str(tmp_path),
         "--startup-timeout-s", "120"],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0
    assert "has no config.json" in result.stdout + result.stderr


def test_sigterm_during_startup_stops_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    # A real checkpoint can take many minutes to load; a supervisor's stop must not wait for that.
    log = tmp_path / "serve.log"
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--model-id", str(tiny_model_dir)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        # Stopped while it loads models: tritonserver has started stubs, which a plain SIGTERM to it left behind.
        while not ((servers := tritonserver_children(proc.pid)) and (stubs := stub_processes(servers[0]))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        assert b"blip2-triton: ready" not in log.read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "stopped during startup" in text and "blip2-triton: ready" not in text, text[-3000:]
    for pid in (servers[0], *stubs):
        assert not running(pid), f"process {pid} outlived the launcher"
