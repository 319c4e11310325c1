"""The served pipeline on one GPU: tritonserver with both stages on CUDA, measured through gRPC, beside the same
stages in-process in the same run (so served / in-process is a ratio from one machine).

    python bench/gpu_served.py --output gpu_served.json             # on the GPU machine: blip2-opt-2.7b shapes
    python bench/gpu_served.py --device cpu --tiny-shapes            # smoke test anywhere

`--cuda-graphs on` serves and runs in-process with BLIP2_CUDA_GRAPHS=on (after `gpu_check` found the graphs
right); `--budget-s` skips the figures that would start past it, counting a server's start. Random weights with the
exact shapes of `Salesforce/blip2-opt-2.7b` (`random_blip2.OPT_2_7B`, written once as a
checkpoint directory), float16 on CUDA. Figures:
  single_caption      one 16-token caption, end to end: served (gRPC, Triton direct) and in-process (vision stage,
                      then the in-flight engine), median of --runs; their ratio
  captions_cN         N closed-loop clients (1, 8, 32, 64, 128 by default), 16-token captions of new images:
                      req/s, tokens/s, p50, p99, served and in-process at the same concurrency, and their ratio
  vqa_mixed_c32       mixed 4/48-token VQA at 32 clients through two servers, BLIP2_SCHEDULER=inflight and static:
                      req/s, p50, p99, and in-flight / static
  vision              the vision stage in-process: ms per image at batch 1 and 32; decode + preprocess of a 224 px
                      and a 4000x3000 JPEG (bench_preprocess.per_image), and the decoder pool's images/s on 1-16
                      threads (it runs beside the forward pass)
  gpu_memory_mib      GPU memory per stage process (nvidia-smi), per server: right after it started and after its
                      load (the eager batch's KV memory grows with the requests admitted); where nvidia-smi's
                      pids are not the stub processes' (a container), what it lists goes under `unattributed`
  server_start_s      seconds from launching tritonserver to ready (both stages load, capture, warm up)
  quantized_MODE      the same captions at --quantized-clients through a server loading bitsandbytes 8-bit or 4-bit
                      weights: req/s, p50, p99 and GPU memory per stage (or the error where bitsandbytes cannot run)
Needs a CUDA build of torch, transformers, tritonclient[grpc] and the nvidia-pytriton wheel (its tritonserver);
on the lent GPU machine `bench/gpu_session.py` brings the missing ones from `.gpu-kit/` (scripts/gpu_kit.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_preprocess
import random_blip2
from bench_throughput import Report, Request, Served, closed_loop, pattern_jpeg, tagged

VQA = "Question: what is in the picture? Answer:"


def _ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 2)


def _point(latencies: list[float], elapsed: float, tokens: int) -> dict[str, float]:
    n = len(latencies)
    return {"requests": n, "requests_per_s": round(n / elapsed, 2), "tokens_per_s": round(n * tokens / elapsed, 1),
            "p50_ms": _ms(latencies, 0.5), "p99_ms": _ms(latencies, 0.99)}


def captions(call: Callable[[Request], str], images: Images, clients: int, count: int, tokens: int
             ) -> dict[str, float]:
    """`count` new images captioned with `tokens` tokens by `clients` closed-loop clients of `call`."""
    latencies, elapsed, _, _ = closed_loop(call, images.requests(count, None, lambda _: tokens), clients)
    return _point(latencies, elapsed, tokens)


class Images:
    """New bytes on every call (a JPEG comment), as distinct user images are: no cache answers them."""

    def __init__(self) -> None:
        self.base = [pattern_jpeg(seed, 640, 480) for seed in range(8)]
        self.counter = 0
        self.lock = threading.Lock()

    def next(self) -> bytes:
        with self.lock:
            self.counter += 1
            k = self.counter
        return tagged(self.base[k % len(self.base)], f"served-{k}")

    def requests(self, n: int, prompt: str | None, tokens: Callable[[int], int]) -> list[Request]:
        return [Request(self.next(), f"img{i}", prompt, tokens(i)) for i in range(n)]


class InProcess:
    """The same stages as the server's, called directly: the vision stage, then the in-flight engine."""

    def __init__(self, model_dir: Path, device: str, dtype: str, cuda_graphs: str = "off") -> None:
        from blip2_triton.llm import InflightEngine, LanguageStage
        from blip2_triton.options import ServerOptions
        from blip2_triton.vision import VisionStage

        options = ServerOptions(model_id=str(model_dir), device=device, dtype=dtype, embedding_cache_bytes=0,
                                cuda_graphs=cuda_graphs)
        self.vision = VisionStage(options)
        self.vision.warm_up(32)
        self.llm = LanguageStage(options)
        self.engine = InflightEngine(self.llm)
        self.engine.capture_graphs()  # as the served stage does
        self.lock = threading.Lock()

    def __call__(self, req: Request) -> str:
        from blip2_triton.llm import Job
        from blip2_triton.requests import GenerationRequest, ImageRequest

        with self.lock:  # one vision batch at a time, as the served stage computes
            (emb,) = self.vision.run([ImageRequest(req.image)])
        done = threading.Event()
        box: list[Any] = []
        self.engine.submit([Job(GenerationRequest(query_embeds=emb, prompt=req.prompt, max_tokens=req.max_tokens),
                                on_piece=None, on_done=lambda r: (box.append(r), done.set()))])
        if not done.wait(600):
            raise TimeoutError("the in-process engine did not answer")
        if isinstance(box[0], Exception):
            raise box[0]
        return str(box[0].text)

    def close(self) -> None:
        self.engine.stop()


@contextlib.contextmanager
def served(model_dir: Path, device: str, dtype: str, log: Path, env: dict[str, str],
           quantization: str = "none", cuda_graphs: str = "off") -> Iterator[Any]:
    from blip2_triton.supervisor import LaunchSettings, TritonServer

    options = {"device": device, "dtype": dtype, "embedding_cache_bytes": "0", "quantization": quantization,
               "cuda_graphs": cuda_graphs}
    settings = LaunchSettings.on_free_ports(model_id=str(model_dir), startup_timeout_s=1200, exit_timeout_s=20,
                                            options=options, env=env, front=False)
    with TritonServer(settings, log_path=log) as server:
        yield server


def gpu_memory_mib(server: Any) -> dict[str, Any]:
    """GPU memory of each stage process of `server`, from nvidia-smi (empty without a GPU). Inside a container
    nvidia-smi may list processes under the host's pids, which match none of the stubs': what it lists for
    processes other than this one then goes under `unattributed` (pid -> MiB) instead of being lost."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used = {int(pid): int(mib) for pid, mib in (line.split(",") for line in out.strip().splitlines() if line)}
    stubs = server.stub_pids()
    memory: dict[str, Any] = {name: used[pid] for name, pid in stubs.items() if pid in used}
    others = {str(pid): mib for pid, mib in used.items() if pid not in {*stubs.values(), os.getpid()}}
    if len(memory) < len(stubs) and others:
        memory["unattributed"] = others
    return memory


def median_ms(call: Callable[[Request], str], requests: list[Request]) -> float:
    times = []
    for req in requests:
        start = time.perf_counter()
        call(req)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:] or times) * 1e3, 2)


def vision_figures(inproc: InProcess, images: Images, device: torch.device, *, quick: bool) -> dict[str, Any]:
    from blip2_triton.requests import ImageRequest

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def per_image_ms(batch: int, runs: int = 5) -> float:
        pixels = torch.stack([inproc.vision.prepare(ImageRequest(images.next())) for _ in range(batch)])
        inproc.vision.embed_pixels(pixels)  # warm-up at this batch size
        sync()
        start = time.perf_counter()
        for _ in range(runs):
            inproc.vision.embed_pixels(pixels)
        sync()
        return round((time.perf_counter() - start) / runs / batch * 1e3, 3)

    figures: dict[str, Any] = {"forward_ms_per_image_batch_1": per_image_ms(1),
                               "forward_ms_per_image_batch_32": per_image_ms(32)}
    processor = inproc.vision.preprocess.processor
    sizes = ((224, 224), (640, 480)) if quick else bench_preprocess.SIZES
    for width, height in sizes:
        figures[f"preprocess_{width}x{height}"] = bench_preprocess.per_image(
            processor, bench_preprocess.photo_jpeg(width, height), runs=2 if quick else 5)
    largest = bench_preprocess.photo_jpeg(*sizes[-1])
    figures[f"decoder_pool_{sizes[-1][0]}x{sizes[-1][1]}_images_per_s"] = {
        threads: bench_preprocess.decoder_pool(processor, largest, threads, 1 if quick else 4)
        for threads in ((1, 2) if quick else (1, 4, 8, 16))}
    return figures


def quantized_point(model_dir: Path, args: Any, dtype: str, mode: str, images: Images) -> dict[str, Any]:
    """16-token captions at --quantized-clients through a server whose stages load `mode` (bitsandbytes), and the
    GPU memory of each stage process."""
    with served(model_dir, args.device, dtype, args.workdir / f"{mode}.log", {}, quantization=mode) as server:
        client = Served(server.grpc_url)
        n = args.quantized_clients
        captions(client, images, n, n, args.tokens)  # warm-up
        point: dict[str, Any] = {"clients": n, **captions(client, images, n, n * args.rounds, args.tokens),
                                 "gpu_memory_mib": gpu_memory_mib(server)}
        client.close()
        return point


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny-shapes", action="store_true", help="a tiny model, for a smoke test")
    p.add_argument("--clients", default="1,8,32,64,128")
    p.add_argument("--rounds", type=int, default=3, help="requests per client at each concurrency")
    p.add_argument("--runs", type=int, default=10, help="single-caption latency runs")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--mixed-requests", type=int, default=128, help="requests of the mixed VQA workload (0: skip)")
    p.add_argument("--quantization", default="8bit,4bit", help="bitsandbytes modes served beside float16 ('': none)")
    p.add_argument("--quantized-clients", type=int, default=32, help="closed-loop clients of the quantized runs")
    p.add_argument("--cuda-graphs", choices=("off", "on", "auto"), default="off",
                   help="BLIP2_CUDA_GRAPHS of the served and in-process stages (quantized servers stay eager)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the figures that would start past this")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/blip2-gpu-served"))
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()  # the budget counts the checkpoint's writing too
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --device cpu --tiny-shapes for a smoke test")
    dtype = "float16" if device.type == "cuda" else "float32"
    shapes = random_blip2.TINY if args.tiny_shapes else random_blip2.OPT_2_7B
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = random_blip2.ensure_model(shapes, args.workdir / "models")
    clients = [int(c) for c in args.clients.split(",")]
    report = Report(args.output, shapes=shapes.name, device=str(device), dtype=dtype, tokens=args.tokens,
                    gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    images = Images()
    server_start_s = 30.0  # until the first server's start is measured

    def in_time(key: str, *, starts_server: bool = False) -> bool:
        # A figure that starts a server needs its start and some room to measure.
        if time.perf_counter() - t0 + (server_start_s + 30.0 if starts_server else 0.0) < args.budget_s:
            return True
        if "skipped" not in report:
            report["skipped"] = f"from {key} on (--budget-s)"
        return False

    def captions_point(client: Any, n: int) -> dict[str, Any]:
        point: dict[str, Any] = {"served": captions(client, images, n, n * args.rounds, args.tokens),
                                 "in_process": captions(inproc, images, n, n * args.rounds, args.tokens)}
        point["served_over_in_process"] = round(
            point["served"]["requests_per_s"] / point["in_process"]["requests_per_s"], 3)
        return point

    def single_caption(client: Any) -> dict[str, Any]:
        served_ms = median_ms(client, images.requests(args.runs + 1, None, lambda _: args.tokens))
        inproc_ms = median_ms(inproc, images.requests(args.runs + 1, None, lambda _: args.tokens))
        return {"served_ms": served_ms, "in_process_ms": inproc_ms,
                "served_over_in_process": round(served_ms / inproc_ms, 3)}

    def mixed_point(client: Any) -> dict[str, Any]:
        latencies, elapsed, _, _ = closed_loop(client, mixed, 32)
        return _point(latencies, elapsed, 26)

    inproc = InProcess(model_dir, args.device, dtype, args.cuda_graphs)
    mixed = images.requests(args.mixed_requests, VQA, lambda i: (4, 48)[i % 2]) if args.mixed_requests else []
    memory: dict[str, Any] = {}
    try:
        report.measure("vision", lambda: vision_figures(inproc, images, device, quick=args.tiny_shapes))
        started = time.perf_counter()
        with served(model_dir, args.device, dtype, args.workdir / "inflight.log", {},
                    cuda_graphs=args.cuda_graphs) as server:
            server_start_s = time.perf_counter() - started
            report["server_start_s"] = round(server_start_s, 1)
            client = Served(server.grpc_url)
            memory["inflight"] = {"at_start": gpu_memory_mib(server)}
            report["gpu_memory_mib"] = memory
            if in_time("single_caption"):
                report.measure("single_caption", lambda: single_caption(client))
            for n in clients:
                if in_time(f"captions_c{n}"):
                    report.measure(f"captions_c{n}", lambda n=n: captions_point(client, n))
            if mixed and in_time("vqa_mixed_c32"):
                report.measure("vqa_mixed_c32", lambda: {"inflight": mixed_point(client)})
            memory["inflight"]["after_load"] = gpu_memory_mib(server)
            report["gpu_memory_mib"] = memory
            client.close()

        def static_side() -> dict[str, Any]:
            with served(model_dir, args.device, dtype, args.workdir / "static.log", {"BLIP2_SCHEDULER": "static"},
                        cuda_graphs=args.cuda_graphs) as server:
                client = Served(server.grpc_url)
                closed_loop(client, images.requests(32, VQA, lambda i: (4, 48)[i % 2]), 32)  # warm-up
                mixed_report = dict(report["vqa_mixed_c32"], static=mixed_point(client))
                mixed_report["inflight_over_static"] = round(
                    mixed_report["inflight"]["requests_per_s"] / mixed_report["static"]["requests_per_s"], 3)
                memory["static"] = {"after_load": gpu_memory_mib(server)}
                report["gpu_memory_mib"] = memory
                client.close()
                return mixed_report

        if mixed and "inflight" in report.get("vqa_mixed_c32", {}) and in_time("vqa_mixed_c32 static",
                                                                                starts_server=True):
            report.measure("vqa_mixed_c32", static_side)
        for mode in filter(None, args.quantization.split(",")):
            if in_time(f"quantized_{mode}", starts_server=True):  # where bitsandbytes cannot run: its error
                report.measure(f"quantized_{mode}",
                               lambda mode=mode: quantized_point(model_dir, args, dtype, mode, images))
    finally:
        inproc.close()
    report.finish()
    return report


if __name__ == "__main__":
    main()
