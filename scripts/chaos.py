#!/usr/bin/env python3
"""Chaos run: the reliability issue's attacks against a replica, with steady good traffic beside them.

    .venv/bin/python scripts/chaos.py                          # starts `blip2-triton serve` (tiny model), ~2 min
    .venv/bin/python scripts/chaos.py --streams 500 --json chaos.json

It starts `blip2-triton serve --max-restarts 3` (the front in front of Triton, as deployed) on free ports, warms
it up, then runs good clients (gRPC and HTTP, through the front) for the whole run while it sends, one after the
other: a 100,000-deep JSON body, an oversized HTTP body and gRPC message, a direct call of an internal stage, a
request without an image, a paused vision stage (SIGSTOP for 3 s), a request of huge 1-bit PNGs and one over the
per-request pixel budget, parallel beam searches, a mass stream cancel, and a tritonserver crash (SIGKILL, the
stand-in for Triton 2.51's abort on a mass cancel). Afterwards it stops the server with SIGTERM.

Checks, each printed with its figures (exit status 1 if any fails):
  * every good request either succeeded with the answer it got before the attacks, or got a retryable error
    (unavailable) while the replica reported unready;
  * every attack got the answer it should (400, 413, RESOURCE_EXHAUSTED, 404, ...);
  * the server is ready again after the attacks;
  * RSS of tritonserver + stubs after the attacks (before the crash) within --max-rss-growth of before them;
  * after the stop, no stub process and no /dev/shm region of this run is left.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from blip2_client import Blip2Client, Blip2Error, ServerUnavailableError
from PIL import Image
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from blip2_triton.supervisor import free_port
from blip2_triton.supervisor.processes import SHM_DIR, SHM_PREFIX, Stub, stub_processes

MIB = 1024 * 1024


def _image(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def one_bit_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, "PNG")
    return buffer.getvalue()


# --- the replica ----------------------------------------------------------------------------------------------


class Replica:
    """`blip2-triton serve` on free ports, its output in a log file."""

    def __init__(self, log: Path, model_id: str | None) -> None:
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        cmd = [sys.executable, "-m", "blip2_triton.cli", "serve", "--host", "127.0.0.1", "--max-restarts", "3",
               "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
               "--metrics-port", str(self.ports["metrics"]), "--exit-timeout-secs", "15"]
        if model_id:
            cmd += ["--model-id", model_id]
        env = {**os.environ, "BLIP2_FRONT_METRICS_PORT": "0"}
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        self.http = f"http://127.0.0.1:{self.ports['http']}"
        self.grpc = f"127.0.0.1:{self.ports['grpc']}"
        # Every stub and shm region this run's servers had, across restarts.
        self.seen: dict[int, Stub] = {}

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.http}/v2/health/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float) -> float:
        started = time.monotonic()
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"not ready after {timeout_s:.0f} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - started

    def triton(self) -> psutil.Process:
        children = [p for p in psutil.Process(self.proc.pid).children() if p.name() == "tritonserver"]
        if not children:
            raise RuntimeError("no tritonserver child")
        return children[0]

    def stubs(self) -> dict[int, Stub]:
        stubs = stub_processes(self.triton().pid)
        self.seen.update(stubs)
        return stubs

    def rss_mb(self) -> dict[str, float]:
        triton = self.triton()
        out = {"tritonserver": triton.memory_info().rss / MIB}
        for stub in self.stubs().values():
            with contextlib.suppress(psutil.NoSuchProcess):
                out[stub.instance] = psutil.Process(stub.pid).memory_info().rss / MIB
        return out

    def stop(self, timeout_s: float = 90.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


# --- good traffic ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    at: float  # when the answer or error came back
    protocol: str
    ok: bool
    retryable: bool = False
    error: str = ""
    started: float | None = None  # when the request was sent


@dataclass
class Traffic:
    replica: Replica
    expected: dict[int, str]
    images: list[bytes]
    threads: int
    outcomes: list[Outcome] = field(default_factory=list)
    readiness: list[tuple[float, bool]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._workers = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.threads)]
        self._workers.append(threading.Thread(target=self._probe, daemon=True))
        for worker in self._workers:
            worker.start()

    def finish(self) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(timeout=180)

    def _client(self, index: int) -> None:
        protocol = "grpc" if index % 2 == 0 else "http"
        url = self.replica.grpc if protocol == "grpc" else self.replica.http
        k = index
        while not self.stop.is_set():
            k = (k + 1) % len(self.images)
            started = time.monotonic()
            try:
                with Blip2Client(url, protocol=protocol, timeout_s=60) as client:
                    text = client.caption(self.images[k], max_tokens=6)
                ok = text == self.expected[k]
                outcome = Outcome(time.monotonic(), protocol, ok, error="" if ok else f"answer changed: {text!r}")
            except ServerUnavailableError as e:
                outcome = Outcome(time.monotonic(), protocol, False, retryable=True, error=e.message[:200],
                                  started=started)
                time.sleep(0.2)  # a retrying client backs off
            except Blip2Error as e:
                outcome = Outcome(time.monotonic(), protocol, False, error=f"{type(e).__name__}: {e.message[:200]}")
            with self.lock:
                self.outcomes.append(outcome)

    def _probe(self) -> None:
        while not self.stop.is_set():
            self.readiness.append((time.monotonic(), self.replica.ready()))
            time.sleep(0.1)

    def unready_near(self, at: float, window_s: float = 1.0, *, since: float | None = None,
                     settle_s: float = 5.0) -> bool:
        """Whether a readiness probe saw the replica unready within `window_s` of `at`, or while the request was in
        flight from `since` (a request caught by a stalled stage fails only when the stage comes back, maybe ready
        by then) and at most `settle_s` before its error."""
        start = (at if since is None else min(since, at)) - window_s
        unready = [t for t, ready in self.readiness if not ready and start <= t <= at + window_s]
        return bool(unready) and at - max(unready) <= max(settle_s, window_s)


# --- attacks --------------------------------------------------------------------------------------------------


def _http_status(response: httpx.Response) -> str:
    return f"HTTP {response.status_code}: {response.text[:120]}"


def deep_json(replica: Replica, levels: int) -> tuple[bool, str]:
    body = '{"inputs": [' * levels + "]}" * levels
    response = httpx.post(f"{replica.http}/v2/models/blip2/infer", content=body, timeout=60)
    return response.status_code == 400 and "nesting" in response.text, _http_status(response)


def oversized_http(replica: Replica, size: int) -> tuple[bool, str]:
    response = httpx.post(f"{replica.http}/v2/models/blip2/infer", content=b"{" + b" " * size, timeout=120,
                          headers={"content-type": "application/json"})
    return response.status_code == 413, _http_status(response)


def oversized_grpc(replica: Replica, size: int) -> tuple[bool, str]:
    request = pb.ModelInferRequest(model_name="blip2")
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(size.to_bytes(4, "little") + b"\0" * size)
    with grpc.insecure_channel(replica.grpc, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e.code().name}: {e.details()[:120]}"
    return False, "accepted"


def internal_model(replica: Replica) -> tuple[bool, str]:
    body = {"inputs": [{"name": "_poll_id", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}
    response = httpx.post(f"{replica.http}/v2/models/blip2_llm/infer", json=body, timeout=30)
    return response.status_code == 404, _http_status(response)


def missing_image(replica: Replica) -> tuple[bool, str]:
    response = httpx.post(f"{replica.http}/v2/models/blip2/generate", json={"max_tokens": 3}, timeout=30)
    return response.status_code == 400 and "image: required input is missing" in response.text, \
        _http_status(response)


def paused_stage(replica: Replica, pause_s: float) -> tuple[bool, str]:
    vision = next(s for s in replica.stubs().values() if s.instance.startswith("blip2_vision"))
    os.kill(vision.pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        unready_after = None
        while time.monotonic() - started < pause_s:
            if unready_after is None and not replica.ready():
                unready_after = time.monotonic() - started
            time.sleep(0.05)
    finally:
        os.kill(vision.pid, signal.SIGCONT)
    back = replica.wait_ready(600)
    return unready_after is not None, f"unready after {unready_after or float('nan'):.2f} s, ready {back:.2f} s " \
                                      f"after resuming, vision stub {'kept' if vision.alive() else 'replaced'}"


def huge_images(replica: Replica) -> tuple[bool, str]:
    client = grpcclient.InferenceServerClient(replica.grpc)
    results = []
    try:
        for rows in (6, 16):
            # A new image per request: rows the embedding cache answers decode nothing and so count no pixels.
            heavy = one_bit_png(4000, 4000 + rows)
            image = grpcclient.InferInput("image", [rows, 1], "BYTES")
            image.set_data_from_numpy(np.array([[heavy]] * rows, dtype=np.object_))
            tokens = grpcclient.InferInput("max_tokens", [rows, 1], "INT32")
            tokens.set_data_from_numpy(np.full((rows, 1), 3, dtype=np.int32))
            try:
                client.infer("blip2", [image, tokens], client_timeout=300)
                results.append((rows, "ok"))
            except InferenceServerException as e:
                results.append((rows, f"{e.status()}: {e.message()[:80]}"))
    finally:
        client.close()
    ok = results[0][1] == "ok" and "pixels in one request" in results[1][1]
    return ok, "; ".join(f"{rows} rows: {what}" for rows, what in results)


def beam_searches(replica: Replica, image: bytes, count: int) -> tuple[bool, str]:
    errors: list[str] = []

    def one() -> None:
        try:
            with Blip2Client(replica.grpc, timeout_s=600) as client:
                client.caption(image, max_tokens=128, beam_width=8)
        except Blip2Error as e:
            errors.append(e.message[:100])

    workers = [threading.Thread(target=one) for _ in range(count)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return not errors, f"{count} beam searches (beam 8, 128 tokens) in {time.monotonic() - started:.1f} s" + (
        f", errors: {errors[:2]}" if errors else "")


def mass_stream_cancel(replica: Replica, image: bytes, streams: int) -> tuple[bool, str]:
    clients, refused = [], 0
    for _ in range(streams):
        client = grpcclient.InferenceServerClient(replica.grpc)
        client.start_stream(callback=lambda result, error: None)
        image_input = grpcclient.InferInput("image", [1, 1], "BYTES")
        image_input.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[256]], dtype=np.int32))
        try:
            client.async_stream_infer("blip2_stream", [image_input, tokens])
        except InferenceServerException:
            refused += 1  # the stream already failed (the front turned it away): still cancelled below
        clients.append(client)
    time.sleep(1.0)
    for client in clients:  # all at once
        client.stop_stream(cancel_requests=True)
    for client in clients:
        client.close()
    back = replica.wait_ready(600)
    return True, f"{streams} streams cancelled at once ({refused} refused at once); ready {back:.2f} s later"


def server_crash(replica: Replica) -> tuple[bool, str]:
    triton = replica.triton()
    stubs = replica.stubs()
    triton.kill()
    started = time.monotonic()
    while replica.ready() or (triton.is_running() and triton.status() != psutil.STATUS_ZOMBIE):
        if time.monotonic() - started > 30:
            break
        time.sleep(0.05)
    back = replica.wait_ready(600)
    leftovers = [s for s in stubs.values() if s.alive()]
    return not leftovers, f"restarted, ready {back:.1f} s after the kill; stubs of the killed server left: " \
                          f"{len(leftovers)}"


# --- the run --------------------------------------------------------------------------------------------------


def regions_of_this_run(replica: Replica, before: set[str]) -> list[str]:
    names = {s.shm_region for s in replica.seen.values() if s.shm_region}
    present = {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")} - before
    return sorted(names & present)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    regions_before = {p.name for p in SHM_DIR.glob(f"{SHM_PREFIX}*")}
    replica = Replica(work / "serve.log", args.model_id)
    report: dict[str, Any] = {"ports": replica.ports}
    try:
        report["startup_s"] = round(replica.wait_ready(args.startup_timeout_s), 1)
        images = [_image(seed) for seed in range(6)]
        with Blip2Client(replica.grpc, timeout_s=120) as client:
            expected = {k: client.caption(image, max_tokens=6) for k, image in enumerate(images)}
        traffic = Traffic(replica, expected, images, args.threads)
        traffic.start()
        time.sleep(args.warmup_s)
        report["rss_before_mb"] = replica.rss_mb()
        attacks: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
            ("deep_json", lambda: deep_json(replica, 100_000)),
            ("oversized_http", lambda: oversized_http(replica, args.oversize_mb * MIB)),
            ("oversized_grpc", lambda: oversized_grpc(replica, args.oversize_mb * MIB)),
            ("internal_model", lambda: internal_model(replica)),
            ("missing_image", lambda: missing_image(replica)),
            ("huge_images", lambda: huge_images(replica)),
            ("beam_searches", lambda: beam_searches(replica, images[0], 3)),
            ("mass_stream_cancel", lambda: mass_stream_cancel(replica, images[1], args.streams)),
        ]
        results: dict[str, dict[str, Any]] = {}

        def attack(name: str, run_attack: Callable[[], tuple[bool, str]]) -> None:
            started = time.monotonic()
            ok, detail = run_attack()
            results[name] = {"ok": ok, "detail": detail, "seconds": round(time.monotonic() - started, 1)}
            print(f"  {name:<20} {'ok' if ok else 'FAILED':<7} {detail}", flush=True)
            time.sleep(args.pause_s)

        for name, run_attack in attacks:
            attack(name, run_attack)
        # Memory is compared before the attacks that restart the server: a restarted one has fresh processes.
        time.sleep(args.settle_s)
        report["rss_after_mb"] = replica.rss_mb()
        attack("paused_stage", lambda: paused_stage(replica, 3.0))
        attack("server_crash", lambda: server_crash(replica))
        report["attacks"] = results
        report["ready_after"] = replica.ready()
        traffic.finish()
    finally:
        code = replica.stop()
    time.sleep(1.0)
    report["stop_status"] = code
    report["stubs_left"] = [f"{s.instance} (pid {s.pid})" for s in replica.seen.values() if s.alive()]
    report["shm_regions_left"] = regions_of_this_run(replica, regions_before)
    report["traffic"] = summarise(traffic)
    report["checks"] = checks(report, args.max_rss_growth)
    return report


def summarise(traffic: Traffic) -> dict[str, Any]:
    outcomes = traffic.outcomes
    retryable = [o for o in outcomes if o.retryable]
    return {
        "requests": len(outcomes),
        "succeeded": sum(o.ok for o in outcomes),
        "retryable_errors": len(retryable),
        "retryable_while_unready": sum(traffic.unready_near(o.at, since=o.started) for o in retryable),
        "failures": [f"{o.protocol}: {o.error}" for o in outcomes if not o.ok and not o.retryable][:20],
        "retryable_examples": sorted({re.sub(r"\d+", "N", o.error) for o in retryable})[:5],
    }


def checks(report: dict[str, Any], max_growth: float) -> dict[str, bool]:
    traffic = report["traffic"]
    before, after = sum(report["rss_before_mb"].values()), sum(report["rss_after_mb"].values())
    report["rss_growth"] = round(after / before - 1, 4)
    return {
        "good traffic succeeded or got retryable errors while unready": not traffic["failures"]
        and traffic["retryable_while_unready"] == traffic["retryable_errors"] and traffic["succeeded"] > 0,
        "every attack answered as it should": all(a["ok"] for a in report["attacks"].values()),
        "ready after the attacks": bool(report["ready_after"]),
        f"RSS within {max_growth:.0%} of before the attacks": report["rss_growth"] <= max_growth,
        "no stub process left after the stop": not report["stubs_left"],
        "no shm region left after the stop": not report["shm_regions_left"],
        "clean stop": report["stop_status"] == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None, help="checkpoint to serve (default: the embedded model)")
    parser.add_argument("--threads", type=int, default=4, help="good clients, half gRPC and half HTTP")
    parser.add_argument("--streams", type=int, default=200, help="streams of the mass cancel (the issue: 500)")
    parser.add_argument("--oversize-mb", type=int, default=80, help="size of the oversized requests (limit: 64)")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--pause-s", type=float, default=1.0, help="good traffic alone between attacks")
    parser.add_argument("--settle-s", type=float, default=3.0, help="before the memory sample after the attacks")
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--startup-timeout-s", type=float, default=600.0)
    parser.add_argument("--workdir", default="/tmp/blip2-chaos")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    print("chaos run: attacks with good traffic beside them", flush=True)
    report = run(args)
    traffic = report["traffic"]
    print(f"good requests: {traffic['requests']}, succeeded {traffic['succeeded']}, retryable "
          f"{traffic['retryable_errors']} (while unready: {traffic['retryable_while_unready']}), failures "
          f"{len(traffic['failures'])}")
    before, after = sum(report["rss_before_mb"].values()), sum(report["rss_after_mb"].values())
    print(f"RSS tritonserver + stubs: {before:.0f} MB before the attacks, {after:.0f} MB after "
          f"({report['rss_growth']:+.1%})")
    for check, passed in report["checks"].items():
        print(f"  {'PASS' if passed else 'FAIL'}  {check}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
