"""Throughput benchmark of the throughput issue: one command, one machine, one run.

    .venv/bin/python bench/bench_throughput.py            # full run (~6 min on 2 quiet cores)
    .venv/bin/python bench/bench_throughput.py --quick    # smoke test (~75 s)

Builds the small random-weight BLIP-2 (`random_blip2.SMALL`, ≈64 M parameters, generated once into the cache
dir) and measures requests/s and p50/p99 latency at each concurrency for:

  a           sequential in-process HF `generate`, one request at a time (c clients queue on one lock)
  b           in-process batched upper bound: VisionStage + LanguageStage called directly, batch size = c
  c_static    the served `blip2` ensemble, BLIP2_SCHEDULER=static (each dynamic batch generated to completion)
  d_inflight  the served ensemble, BLIP2_SCHEDULER=inflight
  d_nocache   d_inflight with BLIP2_EMBEDDING_CACHE_BYTES=0 (repeated-image workload only)

Workloads: `captions` (20 tokens), `vqa_mixed` (alternately 4 and 48 tokens), `repeated` (4 images asked
20-token questions over and over). Captions and VQA send every request as new image bytes (a JPEG comment
carries a unique tag; pixels repeat, so decoding and compute are unchanged), so no cache can serve them.
Writes results.json and one PNG per workload to --output-dir and prints the issue's ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_blip2

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("captions", "vqa_mixed", "repeated")
MODES = ("a", "b", "c_static", "d_inflight", "d_nocache")
QUESTIONS = (
    "Question: what color is the car? Answer:",
    "Question: how many people are in the picture? Answer:",
    "Question: what is the man holding? Answer:",
    "Question: where is the bus? Answer:",
)
REPEATED_IMAGES = 4
# Acceptance targets of the issue, printed next to the measured ratios.
TARGETS = {
    "served_c32_over_a": 2.8,
    "best_served_over_b": 0.85,
    "d_over_c_mixed": 1.5,
    "cache_hit_over_miss_vision": 0.05,
}


@dataclass(frozen=True)
class Request:
    image: bytes
    # Requests with equal (image_id, prompt, max_tokens) must produce the same text in every mode.
    image_id: str
    prompt: str | None
    max_tokens: int

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.image_id, self.prompt, self.max_tokens)


@dataclass
class Point:
    mode: str
    workload: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    tokens_per_s: float
    # 1-minute load average when the point finished: on a shared machine, other tenants slow every mode.
    load_1m: float = 0.0
    # Triton statistics deltas per model (served modes): executions, mean batch, ms per request.
    profile: dict[str, Any] = field(default_factory=dict)


def pattern_jpeg(seed: int, width: int = 320, height: int = 240) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 40 * (seed % 4)], -1)
    pixels = np.clip(base + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tagged(jpeg: bytes, tag: str) -> bytes:
    """The same picture as new bytes: a JPEG comment segment (COM) right after the start-of-image marker."""
    payload = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


class Workloads:
    def __init__(self, tokens: int, pool_size: int = 32) -> None:
        self.tokens = tokens
        self.pool = [pattern_jpeg(seed) for seed in range(pool_size)]
        self.repeated = [pattern_jpeg(1000 + seed) for seed in range(REPEATED_IMAGES)]
        self._runs = itertools.count()

    def requests(self, workload: str, n: int) -> list[Request]:
        run = next(self._runs)
        out = []
        for i in range(n):
            if workload == "repeated":
                j = i % REPEATED_IMAGES
                out.append(Request(self.repeated[j], f"r{j}", QUESTIONS[(i // REPEATED_IMAGES) % len(QUESTIONS)],
                                   self.tokens))
                continue
            j = i % len(self.pool)
            image = tagged(self.pool[j], f"run{run}-req{i}-{time.time_ns()}")
            if workload == "captions":
                out.append(Request(image, f"p{j}", None, self.tokens))
            elif workload == "vqa_mixed":
                out.append(Request(image, f"p{j}", QUESTIONS[i % len(QUESTIONS)], 4 if i % 2 == 0 else 48))
            else:
                raise ValueError(workload)
        return out


def _ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else float("nan")


def make_point(mode: str, workload: str, concurrency: int, requests: Sequence[Request],
               latencies: Sequence[float], seconds: float) -> Point:
    tokens = sum(r.max_tokens for r in requests)
    return Point(
        mode=mode, workload=workload, concurrency=concurrency, requests=len(requests), seconds=seconds,
        rps=len(requests) / seconds, p50_ms=_ms(latencies, 50), p99_ms=_ms(latencies, 99),
        mean_ms=statistics.fmean(latencies) * 1000.0, tokens_per_s=tokens / seconds, load_1m=os.getloadavg()[0],
    )


def closed_loop(call: Callable[[Request], str], requests: Sequence[Request], concurrency: int
                ) -> tuple[list[float], float, list[str]]:
    """`concurrency` clients, each sending its next request as soon as the previous one is answered."""
    n = len(requests)
    latencies = [0.0] * n
    texts = [""] * n
    counter = itertools.count()
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            i = next(counter)
            if i >= n:
                return
            start = time.perf_counter()
            try:
                texts[i] = call(requests[i])
            except BaseException as e:  # re-raised by the caller, in the main thread
                errors.append(e)
                return
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return latencies, elapsed, texts


class Consistency:
    """Every mode must produce the reference text (mode a) for the same image pixels, prompt and length."""

    def __init__(self) -> None:
        self.reference: dict[tuple[str, str | None, int], str] = {}
        self.compared: dict[str, int] = {}
        self.mismatches: dict[str, list[dict[str, Any]]] = {}

    def record(self, mode: str, requests: Sequence[Request], texts: Sequence[str]) -> None:
        for req, text in zip(requests, texts, strict=True):
            if mode == "a":
                self.reference.setdefault(req.key, text)
                continue
            want = self.reference.get(req.key)
            if want is None:
                continue
            self.compared[mode] = self.compared.get(mode, 0) + 1
            if text != want:
                bad = self.mismatches.setdefault(mode, [])
                if len(bad) < 5:
                    bad.append({"key": list(req.key), "got": text, "want": want})
                self.compared.setdefault(f"{mode}_mismatched", 0)
                self.compared[f"{mode}_mismatched"] += 1

    def summary(self) -> dict[str, Any]:
        return {"compared": self.compared, "examples": self.mismatches}


# ---------------------------------------------------------------- in-process modes


class HFSequential:
    """Mode a: the seed's way, HF `generate` per request, one at a time."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.torch = torch
        self.processor = Blip2Processor.from_pretrained(model_dir)
        self.model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
        self.lock = threading.Lock()

    def __call__(self, req: Request) -> str:
        with self.lock, self.torch.inference_mode():
            image = Image.open(io.BytesIO(req.image)).convert("RGB")
            if req.prompt:
                inputs = self.processor(images=image, text=req.prompt, return_tensors="pt")
                prefix = inputs["input_ids"].shape[1]
            else:
                inputs = self.processor(images=image, return_tensors="pt")
                prefix = self.model.config.num_query_tokens + 1
            ids = self.model.generate(**inputs, max_new_tokens=req.max_tokens)
            return self.processor.batch_decode(ids[:, prefix:], skip_special_tokens=True)[0].strip()


class Stages:
    """Mode b: the serving code's two stages called directly, a whole batch at a time, no Triton."""

    def __init__(self, model_dir: Path, cache_bytes: int = 0) -> None:
        from blip2_triton.generation import LanguageStage
        from blip2_triton.options import ServerOptions
        from blip2_triton.vision import VisionStage

        options = ServerOptions(model_id=str(model_dir), embedding_cache_bytes=cache_bytes)
        self.vision = VisionStage(options)
        self.llm = LanguageStage(options)

    def embed(self, reqs: Sequence[Request]) -> list[np.ndarray]:
        from blip2_triton.requests import ImageRequest

        embeds = self.vision.run([ImageRequest(r.image) for r in reqs])
        for e in embeds:
            if isinstance(e, Exception):
                raise e
        return embeds  # type: ignore[return-value]

    def __call__(self, reqs: Sequence[Request]) -> list[str]:
        from blip2_triton.requests import GenerationRequest

        embeds = self.embed(reqs)
        texts = self.llm.run([
            GenerationRequest(query_embeds=e, prompt=r.prompt, max_tokens=r.max_tokens)
            for e, r in zip(embeds, reqs, strict=True)
        ])
        for t in texts:
            if isinstance(t, Exception):
                raise t
        return texts  # type: ignore[return-value]


def run_batched(stages: Stages, workload: str, batch: int, batches: int, workloads: Workloads,
                consistency: Consistency) -> Point:
    requests = workloads.requests(workload, batch * batches)
    latencies: list[float] = []
    start = time.perf_counter()
    for k in range(batches):
        chunk = requests[k * batch:(k + 1) * batch]
        t = time.perf_counter()
        texts = stages(chunk)
        # Every request of a batch is answered when the batch is.
        latencies += [time.perf_counter() - t] * len(chunk)
        consistency.record("b", chunk, texts)
    return make_point("b", workload, batch, requests, latencies, time.perf_counter() - start)


def vision_cache_probe_inprocess(model_dir: Path, workloads: Workloads, k: int) -> dict[str, float]:
    """Vision-stage time per image, miss versus hit, with the stage called directly (one image per call)."""
    from blip2_triton.requests import ImageRequest

    stages = Stages(model_dir, cache_bytes=256 * 1024 * 1024)
    images = [r.image for r in workloads.requests("captions", k)]
    stages.vision.run([ImageRequest(images[0])])  # warm-up, then a fresh set of bytes
    images = [r.image for r in workloads.requests("captions", k)]
    miss, hit = [], []
    for data in images:
        t = time.perf_counter()
        stages.vision.run([ImageRequest(data)])
        miss.append(time.perf_counter() - t)
    for data in images:
        t = time.perf_counter()
        stages.vision.run([ImageRequest(data)])
        hit.append(time.perf_counter() - t)
    stats = stages.vision.cache.stats()
    assert stats.hits >= k, stats
    return {"miss_ms": statistics.median(miss) * 1e3, "hit_ms": statistics.median(hit) * 1e3,
            "hit_over_miss": statistics.median(hit) / statistics.median(miss)}


# ---------------------------------------------------------------- served modes


SERVERS = {
    "c_static": {"BLIP2_SCHEDULER": "static"},
    "d_inflight": {"BLIP2_SCHEDULER": "inflight"},
    "d_nocache": {"BLIP2_SCHEDULER": "inflight", "BLIP2_EMBEDDING_CACHE_BYTES": "0"},
}


class Served:
    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.url = url
        self.local = threading.local()
        self.clients: list[Any] = []
        self.lock = threading.Lock()

    def client(self) -> Any:
        c = getattr(self.local, "client", None)
        if c is None:
            c = self.grpc.InferenceServerClient(self.url)
            self.local.client = c
            with self.lock:
                self.clients.append(c)
        return c

    def inputs(self, req: Request) -> list[Any]:
        image = self.grpc.InferInput("image", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[req.image]], dtype=np.object_))
        tokens = self.grpc.InferInput("max_tokens", [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[req.max_tokens]], dtype=np.int32))
        out = [image, tokens]
        if req.prompt:
            text = self.grpc.InferInput("text_input", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[req.prompt.encode()]], dtype=np.object_))
            out.append(text)
        return out

    def __call__(self, req: Request) -> str:
        result = self.client().infer("blip2", self.inputs(req))
        return result.as_numpy("text_output")[0, 0].decode("utf-8")

    def vision(self, image: bytes) -> None:
        tensor = self.grpc.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        self.client().infer("blip2_vision", [tensor])

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        raw = self.client().get_inference_statistics(as_json=True)
        for s in raw.get("model_stats", []):
            inf = s.get("inference_stats", {})
            out[s["name"]] = {
                "inferences": int(s.get("inference_count", 0)),
                "executions": int(s.get("execution_count", 0)),
                "compute_infer_ns": int(inf.get("compute_infer", {}).get("ns", 0)),
                "compute_infer_count": int(inf.get("compute_infer", {}).get("count", 0)),
                "queue_ns": int(inf.get("queue", {}).get("ns", 0)),
                "success_count": int(inf.get("success", {}).get("count", 0)),
            }
        return out

    def close(self) -> None:
        for c in self.clients:
            c.close()


def custom_metrics(metrics_url: str) -> dict[str, float]:
    """The server's own `blip2_*` metrics (engine, cache), summed over label sets, for the profile."""
    import urllib.request

    out: dict[str, float] = {}
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("blip2_"):
            name, _, value = line.rpartition(" ")
            base = name.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                out[base] = out.get(base, 0.0) + float(value)
    return out


def profile(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Where the time went, per model: mean executed batch, compute and queue ms per request."""
    out: dict[str, Any] = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a[k] - b.get(k, 0) for k in a}
        if d["inferences"] <= 0 and d["success_count"] <= 0:
            continue
        requests = max(d["success_count"], 1)
        out[name] = {
            "inferences": d["inferences"],
            "executions": d["executions"],
            "mean_batch": round(d["inferences"] / d["executions"], 2) if d["executions"] else None,
            "compute_ms_per_execution": round(d["compute_infer_ns"] / max(d["compute_infer_count"], 1) / 1e6, 3),
            "queue_ms_per_request": round(d["queue_ns"] / requests / 1e6, 3),
        }
    return out


def vision_cache_probe_served(served: Served, workloads: Workloads, k: int) -> dict[str, float]:
    """blip2_vision's own compute time (Triton statistics) per image: k new images, then the same k again."""
    images = [r.image for r in workloads.requests("captions", k)]
    s0 = served.stats()["blip2_vision"]
    for data in images:
        served.vision(data)
    s1 = served.stats()["blip2_vision"]
    for data in images:
        served.vision(data)
    s2 = served.stats()["blip2_vision"]

    def per_image(a: dict[str, int], b: dict[str, int]) -> float:
        return (b["compute_infer_ns"] - a["compute_infer_ns"]) / max(b["inferences"] - a["inferences"], 1) / 1e6

    miss, hit = per_image(s0, s1), per_image(s1, s2)
    return {"miss_ms": miss, "hit_ms": hit, "hit_over_miss": hit / miss if miss else float("nan")}


@contextlib.contextmanager
def server(model_dir: Path, env: dict[str, str], log_path: Path) -> Iterator[Any]:
    from blip2_triton.launcher import TritonServer, free_port

    srv = TritonServer(
        model_id=str(model_dir), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        startup_timeout_s=600, exit_timeout_s=10, log_path=log_path, env=env,
    )
    with srv:
        yield srv


# ---------------------------------------------------------------- driver


def requests_for(concurrency: int, rounds: int, minimum: int) -> int:
    return max(minimum, rounds * concurrency)


def best(points: list[Point], mode_prefix: str | tuple[str, ...], workload: str,
         concurrency: int | None = None) -> Point | None:
    chosen = [p for p in points if p.mode.startswith(mode_prefix) and p.workload == workload
              and (concurrency is None or p.concurrency == concurrency)]
    return max(chosen, key=lambda p: p.rps, default=None)


def find(points: list[Point], mode: str, workload: str, concurrency: int) -> Point | None:
    return next((p for p in points if (p.mode, p.workload, p.concurrency) == (mode, workload, concurrency)), None)


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def ratios(points: list[Point], probes: dict[str, Any], top: int) -> dict[str, Any]:
    served = ("c_static", "d_inflight")
    a = best(points, "a", "captions")
    b = best(points, "b", "captions")
    s_top = best(points, served, "captions", top)
    s_any = best(points, served, "captions")
    c_mix, d_mix = find(points, "c_static", "vqa_mixed", top), find(points, "d_inflight", "vqa_mixed", top)
    d_rep, n_rep = find(points, "d_inflight", "repeated", top), find(points, "d_nocache", "repeated", top)
    served_probe = probes.get("served_vision_cache", {})
    return {
        "served_c32_over_a": {
            "value": _ratio(s_top and s_top.rps, a and a.rps),
            "served": s_top and f"{s_top.mode}@{top}: {s_top.rps:.2f} req/s",
            "a": a and f"{a.rps:.2f} req/s",
        },
        "best_served_over_b": {
            "value": _ratio(s_any and s_any.rps, b and b.rps),
            "served": s_any and f"{s_any.mode}@{s_any.concurrency}: {s_any.rps:.2f} req/s",
            "b": b and f"batch {b.concurrency}: {b.rps:.2f} req/s",
        },
        "d_over_c_mixed": {
            "value": _ratio(d_mix and d_mix.rps, c_mix and c_mix.rps),
            "concurrency": top,
            "p99_ms": {"c_static": c_mix and round(c_mix.p99_ms), "d_inflight": d_mix and round(d_mix.p99_ms)},
            "p99_lower": bool(c_mix and d_mix and d_mix.p99_ms < c_mix.p99_ms),
            "p50_ms": {"c_static": c_mix and round(c_mix.p50_ms), "d_inflight": d_mix and round(d_mix.p50_ms)},
        },
        "cache_hit_over_miss_vision": {
            "value": served_probe.get("hit_over_miss") and round(served_probe["hit_over_miss"], 4),
            "served": served_probe,
            "in_process": probes.get("inprocess_vision_cache"),
        },
        "repeated_cache_gain": {
            "value": _ratio(d_rep and d_rep.rps, n_rep and n_rep.rps),
            "concurrency": top,
            "p50_ms": {"cache": d_rep and round(d_rep.p50_ms), "no_cache": n_rep and round(n_rep.p50_ms)},
        },
    }


def print_table(points: list[Point]) -> None:
    print(f"\n{'workload':<10} {'mode':<11} {'c':>3} {'n':>4} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for p in sorted(points, key=lambda p: (WORKLOADS.index(p.workload), MODES.index(p.mode), p.concurrency)):
        print(f"{p.workload:<10} {p.mode:<11} {p.concurrency:>3} {p.requests:>4} {p.rps:>7.2f} "
              f"{p.tokens_per_s:>7.1f} {p.p50_ms:>8.0f} {p.p99_ms:>8.0f}")


def print_ratios(r: dict[str, Any]) -> None:
    print("\nratios (issue targets in brackets):")
    for name, entry in r.items():
        target = TARGETS.get(name)
        value = entry.get("value")
        verdict = ""
        if target is not None and value is not None:
            ok = value <= target if name == "cache_hit_over_miss_vision" else value >= target
            # The issue asks in-flight batching for more req/s *and* a lower p99 on the mixed workload.
            ok = ok and entry.get("p99_lower", True)
            verdict = "meets" if ok else "MISSES"
        limit = "" if target is None else (f"[<= {target}]" if name == "cache_hit_over_miss_vision"
                                           else f"[>= {target}]")
        details = {k: v for k, v in entry.items() if k != "value"}
        print(f"  {name:<28} {value!s:>7} {limit:<9} {verdict:<6} {json.dumps(details)}")


def plot(points: list[Point], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for workload in WORKLOADS:
        mine = [p for p in points if p.workload == workload]
        if not mine:
            continue
        fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
        for mode in MODES:
            series = sorted((p for p in mine if p.mode == mode), key=lambda p: p.concurrency)
            if not series:
                continue
            xs = [p.concurrency for p in series]
            (line,) = ax_rps.plot(xs, [p.rps for p in series], marker="o", label=mode)
            ax_lat.plot(xs, [p.p99_ms / 1000 for p in series], marker="o", color=line.get_color(), label=f"{mode} p99")
            ax_lat.plot(xs, [p.p50_ms / 1000 for p in series], ls="--", color=line.get_color(), alpha=0.6)
        ax_rps.set(title=f"{workload}: throughput", xlabel="concurrency (b: batch size)", ylabel="requests/s")
        ax_lat.set(title=f"{workload}: latency (p99 solid, p50 dashed)", xlabel="concurrency", ylabel="seconds")
        ticks = sorted({p.concurrency for p in mine})
        for ax in (ax_rps, ax_lat):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.grid(alpha=0.3)
        ax_rps.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"throughput_{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def environment() -> dict[str, Any]:
    import torch

    def git_rev() -> str:
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    scheduler = any("BLIP2_SCHEDULER" in p.read_text() for p in (REPO / "src" / "blip2_triton").glob("*.py"))
    return {
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "git": git_rev(),
        "load_average_start": os.getloadavg(), "scheduler_option_present": scheduler,
    }


def model_info(model_dir: Path) -> dict[str, Any]:
    marker = model_dir / "BENCH_MODEL.json"
    return {"dir": str(model_dir), **(json.loads(marker.read_text()) if marker.exists() else {})}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the small model is generated")
    p.add_argument("--model-dir", type=Path, default=None, help="use this checkpoint instead of building one")
    p.add_argument("--quick", action="store_true", help="smoke test: concurrency 1 and 4, one round each")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--concurrency", default=None, help="comma-separated (default 1,8,32)")
    p.add_argument("--tokens", type=int, default=20, help="generated tokens (captions, repeated)")
    p.add_argument("--rounds", type=int, default=None, help="requests per client, served modes (default 2)")
    p.add_argument("--hf-rounds", type=int, default=None, help="requests per client, mode a (default 1)")
    p.add_argument("--min-requests", type=int, default=None, help="fewest requests per point (default 12)")
    p.add_argument("--batches", type=int, default=None, help="batches per batch size, mode b (default 2)")
    p.add_argument("--probe-images", type=int, default=8)
    p.add_argument("--report", type=Path, default=None, metavar="RESULTS_JSON",
                   help="measure nothing: recompute ratios, table and plots of an earlier results.json")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for every server (e.g. OMP_NUM_THREADS=1); repeatable")
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = [int(c) for c in (args.concurrency or ("1,4" if quick else "1,8,32")).split(",")]
    args.rounds = args.rounds or (1 if quick else 2)
    args.hf_rounds = args.hf_rounds or 1
    args.min_requests = args.min_requests or (2 if quick else 12)
    args.batches = args.batches or (1 if quick else 2)
    args.modes = [m for m in args.modes.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if quick:
        args.probe_images = min(args.probe_images, 4)
    try:
        args.server_env = dict(item.split("=", 1) for item in args.server_env)
    except ValueError:
        p.error("--server-env takes NAME=VALUE")
    return args


def report(path: Path) -> dict[str, Any]:
    result = json.loads(path.read_text())
    points = [Point(**p) for p in result["points"]]
    top = max(result["settings"]["concurrency"])
    result["ratios"] = ratios(points, result["probes"], top)
    result["plots"] = plot(points, path.parent)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(points)
    print_ratios(result["ratios"])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    # Background jobs ignore SIGINT; SIGTERM must still unwind the `with server(...)` blocks, or the
    # tritonserver children would outlive the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from blip2_triton.options import default_cache_dir

    model_dir = args.model_dir or random_blip2.ensure_model(random_blip2.SMALL, args.cache_dir or default_cache_dir())
    print(f"model: {model_dir}", flush=True)
    workloads = Workloads(args.tokens)
    consistency = Consistency()
    points: list[Point] = []
    probes: dict[str, Any] = {}
    env = environment()
    if env["load_average_start"][0] > (os.cpu_count() or 1) / 2:
        print(f"warning: load average {env['load_average_start'][0]:.1f} on {os.cpu_count()} CPUs: other jobs "
              "are running, figures will be slow and noisy", flush=True)
    if not env["scheduler_option_present"]:
        print("warning: BLIP2_SCHEDULER is not implemented in this checkout; c_static and d_inflight are "
              "the same server", flush=True)

    def note(point: Point) -> None:
        points.append(point)
        print(f"  {point.mode:<11} {point.workload:<10} c={point.concurrency:<3} n={point.requests:<4} "
              f"{point.rps:6.2f} req/s  p50 {point.p50_ms:7.0f} ms  p99 {point.p99_ms:7.0f} ms  "
              f"load {point.load_1m:.1f}", flush=True)

    if "a" in args.modes:
        print("mode a: sequential HF generate", flush=True)
        hf = HFSequential(model_dir)
        hf(workloads.requests("captions", 1)[0])  # warm-up
        for workload in args.workloads:
            for c in args.concurrency:
                reqs = workloads.requests(workload, requests_for(c, args.hf_rounds, args.min_requests))
                lat, secs, texts = closed_loop(hf, reqs, c)
                consistency.record("a", reqs, texts)
                note(make_point("a", workload, c, reqs, lat, secs))
        del hf
        gc.collect()

    if "b" in args.modes:
        print("mode b: in-process batched stages", flush=True)
        stages = Stages(model_dir)
        stages(workloads.requests("captions", 2))  # warm-up
        sizes = sorted(set(args.concurrency) | ({16} if not args.quick else set()))
        for workload in args.workloads:
            for size in sizes:
                note(run_batched(stages, workload, size, args.batches, workloads, consistency))
        del stages
        gc.collect()
        probes["inprocess_vision_cache"] = vision_cache_probe_inprocess(model_dir, workloads, args.probe_images)
        print(f"  in-process vision cache: {probes['inprocess_vision_cache']}", flush=True)

    logs = args.output_dir / "logs"
    for mode, server_env in SERVERS.items():
        if mode not in args.modes:
            continue
        mode_workloads = ["repeated"] if mode == "d_nocache" else args.workloads
        mode_workloads = [w for w in mode_workloads if w in args.workloads]
        if not mode_workloads:
            continue
        print(f"mode {mode}: served, env {server_env}", flush=True)
        t = time.perf_counter()
        with server(model_dir, {**args.server_env, **server_env}, logs / f"{mode}.log") as srv:
            print(f"  server ready in {time.perf_counter() - t:.0f} s", flush=True)
            served = Served(srv.grpc_url)
            try:
                # Warm-up: the first requests of a fresh process pay one-off costs (allocations, lazy init).
                closed_loop(served, workloads.requests("captions", 2 * min(8, max(args.concurrency))),
                            min(8, max(args.concurrency)))
                if mode != "d_nocache":
                    probe = vision_cache_probe_served(served, workloads, args.probe_images)
                    probes.setdefault("served_vision_cache_by_mode", {})[mode] = probe
                    probes.setdefault("served_vision_cache", probe)
                    print(f"  served vision cache: {probe}", flush=True)
                for workload in mode_workloads:
                    for c in args.concurrency:
                        reqs = workloads.requests(workload, requests_for(c, args.rounds, args.min_requests))
                        before = served.stats()
                        lat, secs, texts = closed_loop(served, reqs, c)
                        point = make_point(mode, workload, c, reqs, lat, secs)
                        point.profile = profile(before, served.stats())
                        consistency.record(mode, reqs, texts)
                        note(point)
                probes.setdefault("server_metrics", {})[mode] = custom_metrics(srv.metrics_url)
            finally:
                served.close()

    top = max(args.concurrency)
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "model": model_info(model_dir),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {**env, "load_average_end": os.getloadavg()},
        "points": [asdict(p) for p in points],
        "probes": probes,
        "ratios": ratios(points, probes, top),
        "consistency": consistency.summary(),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    result["plots"] = plot(points, args.output_dir)
    (args.output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(points)
    print_ratios(result["ratios"])
    print(f"\ntext consistency vs mode a: {json.dumps(consistency.compared)}")
    print(f"wrote {args.output_dir / 'results.json'} and {', '.join(result['plots'])} in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
