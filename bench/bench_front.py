"""What the front adds: per-request latency through the front versus Triton direct (HTTP and gRPC), and the OpenAI
gateway versus gRPC direct (latency, and throughput with concurrent clients), measured in one run.

    python bench/bench_front.py                 # tiny model: starts tritonserver and the front (as a subprocess)
    python bench/bench_front.py --rounds 300 --concurrency 16 --duration-s 20 --json out.json
    python bench/bench_front.py --unique-images --max-tokens 16   # every request a vision-cache miss

Latency: `rounds` rounds, each sending one request on every path in turn (interleaved, so drift hits all paths
alike): the same image (served from the vision stage's cache unless --unique-images), a caption of `max_tokens`;
p50 per path and the difference front - direct. Throughput: closed-loop clients for `duration_s` per path, one path
after the other. The front runs as its own process, as deployed. Nothing is asserted: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from blip2_triton.supervisor import LaunchSettings, TritonServer, free_port


def make_image(size: int = 224) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def kserve_inputs(module: Any, image: bytes, max_tokens: int) -> list[Any]:
    tensor = module.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    tokens = module.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    return [tensor, tokens]


Call = Callable[[], str]


class Paths:
    """One request function per path; clients are per thread (tritonclient's are not thread-safe)."""

    def __init__(self, triton: TritonServer, front_http: str, front_grpc: str, image: bytes, max_tokens: int,
                 unique: bool) -> None:
        self.triton, self.front_http, self.front_grpc = triton, front_http, front_grpc
        self.image, self.max_tokens, self.unique = image, max_tokens, unique
        self._local = threading.local()

    def _image(self) -> bytes:
        # Bytes after the JPEG's end marker change the cache key, not the pixels.
        return self.image + os.urandom(16) if self.unique else self.image

    def _chat_body(self, image: bytes) -> bytes:
        return json.dumps({
            "model": "blip2", "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/jpeg;base64," + base64.b64encode(image).decode()}}]}],
        }).encode()

    def _clients(self) -> dict[str, Any]:
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = {
                "http_direct": httpclient.InferenceServerClient(self.triton.http_hostport, network_timeout=300),
                "http_front": httpclient.InferenceServerClient(self.front_http, network_timeout=300),
                "grpc_direct": grpcclient.InferenceServerClient(self.triton.grpc_url),
                "grpc_front": grpcclient.InferenceServerClient(self.front_grpc),
                "openai_gateway": httpx.Client(base_url=f"http://{self.front_http}", timeout=300),
            }
            self._local.clients = clients
        return clients

    def call(self, path: str) -> str:
        client = self._clients()[path]
        image = self._image()
        if path == "openai_gateway":
            response = client.post("/v1/chat/completions", content=self._chat_body(image),
                                   headers={"content-type": "application/json"})
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]
        module = httpclient if path.startswith("http") else grpcclient
        result = client.infer("blip2", kserve_inputs(module, image, self.max_tokens))
        return result.as_numpy("text_output")[0, 0].decode()


def latency(paths: Paths, names: list[str], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in names}
    texts = {name: paths.call(name) for name in names}  # warm-up, and every path must give the same text
    if len(set(texts.values())) != 1:
        raise SystemExit(f"paths disagree: {texts}")
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            paths.call(name)
            samples[name].append((time.perf_counter() - start) * 1000)
    return samples


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def throughput(paths: Paths, name: str, concurrency: int, duration_s: float, front_pid: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration_s

    def worker() -> None:
        mine = []
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            paths.call(name)
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu_before = cpu_seconds(front_pid)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    front_cpu = cpu_seconds(front_pid) - cpu_before
    return {"requests": len(latencies), "req_per_s": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies), "p99_ms": float(np.percentile(latencies, 99)),
            # CPU the front process spent per request (0 for direct paths, which bypass it).
            "front_cpu_ms_per_request": front_cpu * 1000 / max(len(latencies), 1)}


@contextlib.contextmanager
def servers(model_id: str | None) -> Iterator[tuple[TritonServer, str, str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        if model_id is None:
            from blip2_triton.tiny import write_tiny_model

            model_id = str(write_tiny_model(Path(tmp) / "tiny-blip2-opt"))
        triton = TritonServer(LaunchSettings.on_free_ports(model_id=model_id), log_path=Path(tmp) / "tritonserver.log")
        print(f"starting tritonserver ({model_id}) ...", file=sys.stderr)
        with triton:
            http_port, grpc_port = free_port(), free_port()
            front = subprocess.Popen(
                [sys.executable, "-m", "blip2_triton.front", "--host", "127.0.0.1", "--triton-http",
                 triton.http_hostport, "--triton-grpc", triton.grpc_url, "--http-port", str(http_port),
                 "--grpc-port", str(grpc_port), "--metrics-port", "-1", "--access-log", "off"],
                env={**os.environ, "BLIP2_FRONT_TOKENIZERS": f"blip2={model_id}"})
            try:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready").status_code == 200:
                            break
                    time.sleep(0.2)
                else:
                    raise SystemExit("front not ready")
                yield triton, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", front.pid
            finally:
                front.terminate()
                front.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", default=None, help="checkpoint (default: the tiny model)")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--unique-images", action="store_true", help="every request a vision-cache miss")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    image = make_image()
    names = ["http_direct", "http_front", "grpc_direct", "grpc_front", "openai_gateway"]
    with servers(args.model_id) as (triton, front_http, front_grpc, front_pid):
        paths = Paths(triton, front_http, front_grpc, image, args.max_tokens, args.unique_images)
        samples = latency(paths, names, args.rounds)
        rates = {name: throughput(paths, name, args.concurrency, args.duration_s, front_pid)
                 for name in ("grpc_direct", "grpc_front", "openai_gateway")}
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "image_bytes": len(image), "cpu_count": os.cpu_count(),
                   "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]},
        "latency_p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "added_p50_ms": {
            "http_front - http_direct": round(p50["http_front"] - p50["http_direct"], 2),
            "grpc_front - grpc_direct": round(p50["grpc_front"] - p50["grpc_direct"], 2),
            "openai_gateway - grpc_direct": round(p50["openai_gateway"] - p50["grpc_direct"], 2),
        },
        "throughput": {k: {m: round(v, 3) for m, v in r.items()} for k, r in rates.items()},
        "throughput_ratio_vs_grpc_direct": {
            k: round(r["req_per_s"] / rates["grpc_direct"]["req_per_s"], 3) for k, r in rates.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
