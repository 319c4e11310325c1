#!/usr/bin/env python3
"""Soak test: a bounded, fixed load against a BLIP-2 Triton server, with the server processes' memory sampled.

    python scripts/soak.py --duration-s 300 --threads 4            # starts its own server (tiny model)
    python scripts/soak.py --model-id /models/blip2-opt-2.7b ...   # a real checkpoint
    python scripts/soak.py --grpc-url 127.0.0.1:8001 --server-pid PID --duration-s 60   # an already running server

After a warm-up (allocators, caches and lazily built kernels settle), it records the resident memory (VmRSS from
/proc) of tritonserver and of every Python stub, runs `--threads` clients in a closed loop for `--duration-s`,
samples memory again and prints requests, failures, latencies and RSS before/after per process. Every answer
is also checked against the first answer for the same input (greedy decoding is deterministic). Exit status 1 on
any failure, inconsistent answer, or RSS growth above --max-growth-mb for a process.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

from blip2_triton.supervisor.processes import stub_processes

PROMPTS = (None, "Question: what is in the picture? Answer:", "Question: what color is it? Answer:")


def workload() -> list[tuple[bytes, str | None, int]]:
    """A fixed mix: a few image sizes and formats, captions and questions, short and longer answers."""
    rng = np.random.default_rng(0)
    images = []
    for i, (w, h, fmt) in enumerate(((320, 240, "JPEG"), (640, 480, "PNG"), (96, 96, "WEBP"), (1024, 768, "JPEG"))):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // (i + 1)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        images.append(buf.getvalue())
    return [(img, prompt, 6 + 4 * ((i + j) % 4)) for i, img in enumerate(images) for j, prompt in enumerate(PROMPTS)]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def server_processes(server_pid: int) -> dict[str, int]:
    procs = {"tritonserver": server_pid}
    procs.update({f"stub {s.instance}": s.pid for s in stub_processes(server_pid).values()})
    return procs


def memory(procs: dict[str, int]) -> dict[str, float | None]:
    return {name: rss_mb(pid) for name, pid in procs.items()}


@dataclass
class Stats:
    requests: int = 0
    failures: int = 0
    inconsistent: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _request(client: Any, image: bytes, prompt: str | None, max_tokens: int, timeout_s: float) -> str:
    inputs = [grpcclient.InferInput("image", [1, 1], "BYTES"), grpcclient.InferInput("max_tokens", [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(np.array([[image]], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    if prompt is not None:
        text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
        inputs.append(text)
    result = client.infer("blip2", inputs, client_timeout=timeout_s)
    return str(result.as_numpy("text_output")[0, 0].decode("utf-8"))


def fresh_image(rng: np.random.Generator) -> bytes:
    # Never seen before, so the vision stage decodes and embeds it (no embedding-cache hit).
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def run_load(url: str, threads: int, seconds: float, stats: Stats | None, expected: dict[int, str],
             timeout_s: float, unique_every: int) -> None:
    jobs = workload()
    stop_at = time.monotonic() + seconds

    def worker(offset: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        rng = np.random.default_rng([offset, time.monotonic_ns()])
        i = offset
        try:
            while time.monotonic() < stop_at:
                key = i % len(jobs)
                image, prompt, max_tokens = jobs[key]
                i += 1
                if unique_every and i % unique_every == 0:
                    key, image = -1, fresh_image(rng)
                started = time.monotonic()
                try:
                    text = _request(client, image, prompt, max_tokens, timeout_s)
                    error = None
                except Exception as e:
                    text, error = None, f"{type(e).__name__}: {str(e)[:120]}"
                if stats is None:
                    if text is not None and key >= 0:
                        expected.setdefault(key, text)
                    continue
                with stats.lock:
                    stats.requests += 1
                    stats.latencies.append(time.monotonic() - started)
                    if error is not None:
                        stats.failures += 1
                        stats.errors[error] = stats.errors.get(error, 0) + 1
                    elif key >= 0 and expected.setdefault(key, text) != text:
                        stats.inconsistent += 1
        finally:
            client.close()

    pool = [threading.Thread(target=worker, args=(k * 5,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


class MemorySampler:
    """VmRSS of every server process every `every_s` seconds while the load runs: a leak keeps growing through
    the run, warm-up growth flattens out, and the second half of the run tells them apart."""

    def __init__(self, procs: dict[str, int], every_s: float) -> None:
        self.procs, self.every_s = procs, every_s
        self.samples: list[tuple[float, dict[str, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - started, memory(self.procs)))
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, memory(self.procs)))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.samples if m.get(name) is not None]  # type: ignore[misc]


def report(args: argparse.Namespace, stats: Stats, sampler: MemorySampler) -> dict[str, Any]:
    lat = np.array(stats.latencies) if stats.latencies else np.zeros(1)
    rows = []
    for name in sorted(sampler.procs, key=lambda n: (n != "tritonserver", n)):
        series = sampler.series(name)
        alive = sampler.samples[-1][1].get(name) is not None
        b, a = (series[0], series[-1]) if series and alive else (series[0] if series else None, None)
        mid = series[len(series) // 2] if series else None
        rows.append({"process": name, "rss_before_mb": b, "rss_after_mb": a,
                     "rss_max_mb": max(series) if series else None,
                     "growth_mb": None if a is None or b is None else a - b,
                     "growth_second_half_mb": None if a is None or mid is None else a - mid,
                     "rss_series_mb": [[round(t, 1), m.get(name)] for t, m in sampler.samples]})
    return {
        "duration_s": args.duration_s, "threads": args.threads, "requests": stats.requests,
        "failures": stats.failures, "inconsistent": stats.inconsistent,
        "throughput_rps": stats.requests / args.duration_s,
        "latency_p50_ms": float(np.percentile(lat, 50) * 1000), "latency_p95_ms": float(np.percentile(lat, 95) * 1000),
        "errors": stats.errors, "processes": rows,
    }


def print_report(result: dict[str, Any]) -> None:
    print(f"soak: {result['requests']} requests in {result['duration_s']:.0f} s from {result['threads']} threads "
          f"({result['throughput_rps']:.1f} req/s), failures {result['failures']}, "
          f"inconsistent answers {result['inconsistent']}, latency p50 {result['latency_p50_ms']:.0f} ms "
          f"p95 {result['latency_p95_ms']:.0f} ms")
    for error, count in result["errors"].items():
        print(f"  error x{count}: {error}")
    def fmt(v: float | None) -> str:
        return "gone" if v is None else f"{v:.1f}"

    print(f"{'process':<30} {'RSS before MB':>14} {'RSS after MB':>13} {'max MB':>8} {'growth MB':>10} "
          f"{'2nd half MB':>12}")
    for row in result["processes"]:
        print(f"{row['process']:<30} {fmt(row['rss_before_mb']):>14} {fmt(row['rss_after_mb']):>13} "
              f"{fmt(row['rss_max_mb']):>8} {fmt(row['growth_mb']):>10} {fmt(row['growth_second_half_mb']):>12}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=60.0, help="measured load duration")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load before the first memory sample")
    parser.add_argument("--threads", type=int, default=4, help="concurrent closed-loop clients")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="client deadline per request")
    parser.add_argument("--unique-every", type=int, default=2,
                        help="every Nth request carries a never-seen image (0: only the fixed, checked set)")
    parser.add_argument("--sample-every-s", type=float, default=5.0, help="RSS sampling period")
    parser.add_argument("--max-growth-mb", type=float, default=64.0,
                        help="largest accepted RSS growth of any one server process")
    parser.add_argument("--model-id", default=None, help="checkpoint for a server started here (default: tiny)")
    parser.add_argument("--grpc-url", default=None, help="use this running server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None, help="its tritonserver pid (with --grpc-url)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if (args.grpc_url is None) != (args.server_pid is None):
        parser.error("--grpc-url and --server-pid go together")

    server = None
    if args.grpc_url is None:
        from blip2_triton.supervisor import LaunchSettings, TritonServer
        from blip2_triton.tiny import write_tiny_model

        work = Path(tempfile.mkdtemp(prefix="blip2-soak-"))
        model_id = args.model_id or str(write_tiny_model(work / "tiny-blip2-opt"))
        server = TritonServer(LaunchSettings.on_free_ports(model_id=model_id, exit_timeout_s=30),
                              log_path=work / "tritonserver.log")
        print(f"soak: starting tritonserver (log {work / 'tritonserver.log'})", flush=True)
        server.start()
        assert server.process is not None
        url, server_pid = server.grpc_url, server.process.pid
    else:
        url, server_pid = args.grpc_url, args.server_pid
    try:
        expected: dict[int, str] = {}
        run_load(url, args.threads, args.warmup_s, None, expected, args.timeout_s, args.unique_every)
        stats = Stats()
        with MemorySampler(server_processes(server_pid), args.sample_every_s) as sampler:
            run_load(url, args.threads, args.duration_s, stats, expected, args.timeout_s, args.unique_every)
    finally:
        if server is not None:
            server.stop()
    result = report(args, stats, sampler)
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    grown = [r["process"] for r in result["processes"]
             if r["growth_mb"] is None or r["growth_mb"] > args.max_growth_mb]
    if grown:
        print(f"soak: RSS grew more than {args.max_growth_mb} MB (or the process died): {', '.join(grown)}")
    return 1 if stats.failures or stats.inconsistent or grown or stats.requests == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
