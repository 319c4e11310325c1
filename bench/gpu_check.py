"""GPU check for one H100/H200-class GPU: blip2-opt-2.7b's exact shapes, random weights, float16, no downloads.

    .venv/bin/python bench/gpu_check.py                                # on the GPU machine (< 8 min)
    .venv/bin/python bench/gpu_check.py --device cpu --tiny-shapes     # smoke test anywhere (seconds)

Runs the serving code's own stages in-process (`VisionStage` + `LanguageStage`, one shared model) and prints
one JSON object:
  single_request   latency of one request generating 16 tokens (vision + LLM, and each part), plus HF
                   `generate` on the same model for comparison (TensorRT-LLM's published 41.9 ms is a ~3-token
                   answer: compare it with graphs.*.vqa_3_tokens)
  concurrency_32   requests/s and tokens/s with 32 requests batched through both stages
  llm_mixed_c32    the LLM stage alone on VQA requests of mixed length (alternately 4 and 48 tokens), 32 clients:
                   static batches (each waits for its longest row, as `BLIP2_SCHEDULER=static` does) against
                   the in-flight engine (`BLIP2_SCHEDULER=inflight`) in a closed loop; req/s, p50/p99 (a static
                   request's latency is its batch's), and whether both produce the same text for every request
single_request.llm_inflight: the LLM part of one request through the in-flight engine, alone
  decode_step_ms   one decoding step of the in-flight engine's batch (its KV buffers), 1 and 32 rows, with and
                   without padding: on a GPU this shows whether steps are host-bound (same cost for 1 and 32 rows)
  engine_iteration the in-flight engine's loop at --concurrency rows generating --iteration-tokens each: ms per
                   iteration with the real step, and with the step replaced by fixed logits (the engine's own host
                   work), plain and streaming rows; on CUDA, device-to-host syncs per iteration (24 tokens, also
                   per mode under graphs)
  graphs           the LLM stage with decoding steps on fixed buffers (`BLIP2_CUDA_GRAPHS`: CUDA graphs on a GPU,
                   the same step eagerly on CPU; `on` first) against HF's eager forward, in one run: the capture
                   of a served engine's buckets (count, seconds, bytes), decoding steps at 1/8/32/64
                   rows with ~40 and ~300 cached positions beside the floor from the measured copy bandwidth, one
                   16-token request end to end, the TensorRT-LLM case (a VQA request whose answer is 3 tokens, vision
                   included: end-to-end figures use the vision stage in the same mode), captions with 32 and 64
                   requests in flight through both stages, the mixed workload,
                   greedy text against HF (first divergent position and its top-2 margin where fp16 flips a token)
                   and a seeded request alone against the same in a batch of 32
  vision_graphs    the vision stage's forward (ViT + Q-Former + projection, decoded pixels in) per image at batch 1
                   and 32, eager (`off`) against fixed buffers per batch bucket (`on`: CUDA graphs on a GPU, the
                   same buffers eagerly on CPU), the graphs' memory and capture time, and the largest absolute
                   difference of the embeddings from the eager path's (also at 5 rows: a batch padded to 8)
Generation never stops early (the EOS logit is pinned at zero), so every request does the same work.
"""

from __future__ import annotations

import argparse
import io
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_blip2
from bench_throughput import Report, failure, pattern_jpeg, tagged


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 2),
        "min_ms": round(ordered[0] * 1e3, 2),
        "max_ms": round(ordered[-1] * 1e3, 2),
        "runs": len(ordered),
    }


def build_stages(shapes: random_blip2.Shapes, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    from blip2_triton.checkpoint import LoadedStage, count_parameters
    from blip2_triton.llm import LanguageStage
    from blip2_triton.options import ServerOptions
    from blip2_triton.vision import VisionStage

    model, processor = random_blip2.build_model(shapes, dtype=dtype, device=device)
    count, nbytes = count_parameters(model)
    loaded = LoadedStage(model, processor, model.config, f"random:{shapes.name}", device, dtype, count, nbytes)
    dtype_name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    # No cache: every request must pay the vision stage, as a new image would.
    options = ServerOptions(dtype=dtype_name, device=device.type, embedding_cache_bytes=0)
    options.validate()
    return VisionStage(options, loaded=loaded), LanguageStage(options, loaded=loaded), loaded


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default float16 on cuda, float32 on cpu")
    p.add_argument("--tiny-shapes", action="store_true", help="a tiny model, for a smoke test")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency-runs", type=int, default=10)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--mixed-rounds", type=int, default=4, help="requests per client in llm_mixed_c32 (0: skip)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip remaining phases past this (8 min limit)")
    p.add_argument("--graphs", choices=("compare", "skip"), default="compare",
                   help="measure decoding on fixed buffers / CUDA graphs against the eager forward")
    p.add_argument("--graph-rows", default="1,8,32,64", help="rows of the measured decoding steps")
    p.add_argument("--graph-cached", default="40,300", help="cached positions of the measured decoding steps")
    p.add_argument("--graph-clients", default="32,64", help="requests in flight for the captions phases")
    p.add_argument("--vision-graphs", choices=("compare", "skip"), default="compare",
                   help="measure the vision forward on fixed buffers / CUDA graphs against the eager forward")
    p.add_argument("--vision-batches", default="1,32", help="batch sizes of the vision_graphs timings")
    p.add_argument("--iteration-tokens", default="24", help="tokens per row of the engine_iteration runs")
    p.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --device cpu --tiny-shapes for a smoke test")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    shapes = random_blip2.TINY if args.tiny_shapes else random_blip2.OPT_2_7B
    torch.manual_seed(0)

    from blip2_triton.requests import GenerationRequest, ImageRequest

    report = Report(args.output, shapes=shapes.name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                    torch=torch.__version__, tokens=args.tokens, concurrency=args.concurrency)
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    vision, llm, loaded = build_stages(shapes, device, dtype)
    report["parameters"] = loaded.parameter_count
    report["build_s"] = round(time.perf_counter() - t0, 1)
    base = [pattern_jpeg(seed, 640, 480) for seed in range(8)]
    counter = iter(range(10**9))

    def images(n: int) -> list[bytes]:
        # New bytes every time (a JPEG comment), as distinct user images would be.
        return [tagged(base[i % len(base)], f"gpu-check-{next(counter)}") for i in range(n)]

    def one(image: bytes) -> tuple[float, float, str]:
        t = time.perf_counter()
        (emb,) = vision.run([ImageRequest(image)])
        _sync(device)
        t_vision = time.perf_counter() - t
        (text,) = llm.run([GenerationRequest(query_embeds=emb, max_tokens=args.tokens)])
        _sync(device)
        return t_vision, time.perf_counter() - t, str(text)

    def batch(n: int) -> float:
        t = time.perf_counter()
        embeds = vision.run([ImageRequest(b) for b in images(n)])
        texts = llm.run([GenerationRequest(query_embeds=e, max_tokens=args.tokens) for e in embeds])
        _sync(device)
        assert all(isinstance(x, str) for x in texts), texts
        return time.perf_counter() - t

    # Warm-up: kernel selection, allocator growth and lazy initialisation belong to no measured request.
    for image in images(2):
        one(image)
    batch(args.concurrency)
    report["warmup_done_s"] = round(time.perf_counter() - t0, 1)

    vision_s, total_s = [], []
    for image in images(args.latency_runs):
        t_vision, t_total, text = one(image)
        vision_s.append(t_vision)
        total_s.append(t_total)
    llm_s = [t - v for t, v in zip(total_s, vision_s, strict=True)]
    report["single_request"] = {
        "end_to_end": _percentiles(total_s),
        "vision": _percentiles(vision_s),
        "llm": _percentiles(llm_s),
        "llm_ms_per_token": round(statistics.median(llm_s) * 1e3 / args.tokens, 2),
        "sample_text": text,
    }

    single = report["single_request"]
    if time.perf_counter() - t0 < args.budget_s:
        # The same kind of request through the in-flight engine (the server's default scheduler), one at a time.
        report.measure("single_request", lambda: {**single, "llm_inflight": _percentiles(inflight_latency(
            llm, [vision.run([ImageRequest(b)])[0] for b in images(2)], args.tokens, args.latency_runs))})

    def against_hf() -> dict[str, Any]:
        hf = hf_generate_latency(loaded, base[0], args.tokens, device, runs=5)
        # The serving path must produce HF's greedy text for the same image (in this dtype, on this device).
        _, _, served_text = one(tagged(base[0], "gpu-check-compare"))
        return {**report["single_request"], "hf_generate": hf, "text_matches_hf": served_text == hf["text"]}

    if time.perf_counter() - t0 < args.budget_s:
        report.measure("single_request", against_hf)

    def batched() -> dict[str, Any]:
        times = []
        for _ in range(args.batches):
            if time.perf_counter() - t0 > args.budget_s:
                report["skipped"] = "concurrency batches cut short by --budget-s"
                break
            times.append(batch(args.concurrency))
        n = args.concurrency * len(times)
        return {"requests_per_s": round(n / sum(times), 2), "tokens_per_s": round(n * args.tokens / sum(times), 1),
                "batch_latency": _percentiles(times)} if times else {"skipped": "--budget-s"}

    report.measure("concurrency_32", batched)
    # The LLM-only phases below share one set of embeddings.
    embeds = vision.run([ImageRequest(b) for b in images(args.concurrency)])
    # From here on each figure is written as soon as it is measured, and one that fails records its error.
    if time.perf_counter() - t0 < args.budget_s:
        report.measure("decode_step_ms", lambda: decode_step_costs(llm, embeds, args.concurrency, device))
    if time.perf_counter() - t0 < args.budget_s:
        report.measure("engine_iteration", lambda: {
            f"tokens_{n}": engine_iterations(llm, embeds, device, tokens=int(n))
            for n in args.iteration_tokens.split(",")})
    if args.mixed_rounds and time.perf_counter() - t0 < args.budget_s:
        report.measure("llm_mixed_c32", lambda: static_vs_inflight(llm, embeds, args.concurrency,
                                                                   args.mixed_rounds, device))
    if args.vision_graphs == "compare" and time.perf_counter() - t0 < args.budget_s:
        report.measure("vision_graphs", lambda: vision_graphs_comparison(
            vision, loaded, images, device, [int(v) for v in args.vision_batches.split(",")], args.latency_runs))
    if args.graphs == "compare" and time.perf_counter() - t0 < args.budget_s:
        report.measure("graphs", lambda: graphs_comparison(vision, loaded, images, device, args,
                                                           deadline=t0 + args.budget_s, report=report))
    if device.type == "cuda":
        report["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    report.finish()
    return report


def captured_engine(llm: Any, **kwargs: Any) -> Any:
    """An in-flight engine with its graphs captured, as the served stage starts one; stopped if the capture fails
    (a live engine would hold its batch state's memory through the figures after it)."""
    from blip2_triton.llm import InflightEngine

    engine = InflightEngine(llm, **kwargs)
    try:
        engine.capture_graphs()
    except BaseException:
        engine.stop()
        raise
    return engine


def engine_calls(engine: Any, requests: list[Any], timeout_s: float) -> list[str]:
    """Submits `requests` to an `InflightEngine` together and waits for their texts, in order; raises what ended the
    first job that failed."""
    import threading

    from blip2_triton.llm import Job

    done = threading.Semaphore(0)
    results: dict[int, Any] = {}
    engine.submit([Job(request=request, on_piece=None,
                       on_done=lambda r, i=i: (results.__setitem__(i, r), done.release()))
                   for i, request in enumerate(requests)])
    for _ in requests:
        if not done.acquire(timeout=timeout_s):
            raise TimeoutError(f"the in-flight engine did not answer in {timeout_s:.0f} s")
    ordered = [results[i] for i in range(len(requests))]
    errors = [r for r in ordered if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    return [str(r.text) for r in ordered]


def engine_call(engine: Any, request: Any, timeout_s: float) -> str:
    """Submits one request to an `InflightEngine` and waits for its text; raises what ended the job."""
    return engine_calls(engine, [request], timeout_s)[0]


def inflight_latency(llm: Any, embeds: list[Any], tokens: int, runs: int) -> list[float]:
    from blip2_triton.llm import InflightEngine
    from blip2_triton.requests import GenerationRequest

    engine = InflightEngine(llm)
    times: list[float] = []
    try:
        for i in range(runs + 1):
            t = time.perf_counter()
            engine_call(engine, GenerationRequest(query_embeds=embeds[i % len(embeds)], max_tokens=tokens), 300)
            if i:  # the first is warm-up
                times.append(time.perf_counter() - t)
    finally:
        engine.stop()
    return times


def decode_step_costs(llm: Any, embeds: list[Any], rows: int, device: torch.device, steps: int = 20
                      ) -> dict[str, float]:
    """Median ms of one decoding step on the engine's KV buffers, for 1 and `rows` rows, unpadded and padded."""
    from blip2_triton.requests import GenerationRequest

    def step_ms(prompts: list[str]) -> float:
        seqs = [llm.prepare(GenerationRequest(query_embeds=embeds[i % len(embeds)], prompt=p, max_tokens=steps + 1))
                for i, p in enumerate(prompts)]
        return round(statistics.median(_step_times(llm, seqs, steps, device)[2:]) * 1e3, 2)

    short = MIXED_PROMPT
    mixed = [short, short + " Describe it in a few words."] * (rows // 2) + [short] * (rows % 2)
    step_ms([short])  # warm-up of both shapes
    step_ms(mixed)
    return {"rows_1": step_ms([short]), f"rows_{rows}": step_ms([short] * rows), f"rows_{rows}_padded": step_ms(mixed)}


MIXED_PROMPT = "Question: what is in the picture? Answer:"
MIXED_TOKENS = (4, 48)


def static_vs_inflight(llm: Any, embeds: list[Any], concurrency: int, rounds: int,
                       device: torch.device) -> dict[str, Any]:
    """The LLM stage on the mixed-length workload: static batches of `concurrency` against the in-flight
    engine with `concurrency` closed-loop clients, over the same requests."""
    import threading

    from blip2_triton.llm import EngineLimits
    from blip2_triton.requests import GenerationRequest

    n = concurrency * rounds
    specs = [(i % len(embeds), MIXED_TOKENS[i % 2]) for i in range(n)]

    def request(k: int) -> GenerationRequest:
        e, tokens = specs[k]
        return GenerationRequest(query_embeds=embeds[e], prompt=MIXED_PROMPT, max_tokens=tokens)

    # Static batches as `BLIP2_SCHEDULER=static` serves them: one engine of that policy, its graphs captured first
    # (a `run` per batch would hold a new batch state, and capture again, every time).
    static = captured_engine(llm, limits=EngineLimits(policy="static", max_active=concurrency, max_kv_tokens=2**62))

    def static_batch(ks: list[int]) -> list[str]:
        return engine_calls(static, [request(k) for k in ks], 600)

    static_text: dict[int, str] = {}
    static_latency: list[float] = []
    try:
        static_batch(list(range(min(n, concurrency))))  # warm-up at this batch size
        t = time.perf_counter()
        for start in range(0, n, concurrency):
            ks = list(range(start, min(n, start + concurrency)))
            t_batch = time.perf_counter()
            static_text.update(zip(ks, static_batch(ks), strict=True))
            static_latency += [time.perf_counter() - t_batch] * len(ks)
        static_s = time.perf_counter() - t
    finally:
        static.stop()

    engine = captured_engine(llm)
    try:
        inflight_text: dict[int, str] = {}
        inflight_latency: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        next_k = iter(range(n))

        def client() -> None:
            while True:
                with lock:
                    k = next(next_k, None)
                if k is None:
                    return
                t_req = time.perf_counter()
                try:
                    text = engine_call(engine, request(k), 600)
                except Exception as e:  # re-raised by the caller, in the main thread
                    with lock:
                        errors.append(e)
                    if isinstance(e, TimeoutError):  # the engine is stuck: this client stops
                        return
                    continue
                with lock:
                    inflight_latency.append(time.perf_counter() - t_req)
                    inflight_text[k] = text

        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        inflight_s = time.perf_counter() - t
    finally:
        engine.stop()
    if errors:
        raise RuntimeError(f"in-flight engine failed {len(errors)} requests: {errors[0]!r}") from errors[0]

    def q(values: list[float], pct: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(pct * len(ordered)))] * 1e3, 1)

    static_rps, inflight_rps = n / static_s, n / inflight_s
    return {
        "requests": n, "tokens": list(MIXED_TOKENS), "concurrency": concurrency,
        "static": {"requests_per_s": round(static_rps, 2), "p50_ms": q(static_latency, 0.5),
                   "p99_ms": q(static_latency, 0.99)},
        "inflight": {"requests_per_s": round(inflight_rps, 2), "p50_ms": q(inflight_latency, 0.5),
                     "p99_ms": q(inflight_latency, 0.99)},
        "inflight_over_static": round(inflight_rps / static_rps, 2),
        "texts_identical": static_text == inflight_text,
    }


def copy_bandwidth_gbps(device: torch.device) -> float | None:
    """Device-to-device copy, bytes read plus written per second: the ceiling a decoding step streams weights at."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # On the copies' stream: a bare `record()` records on the current device's, which `--device cuda:N` is not.
    stream = torch.cuda.current_stream(device)
    start.record(stream)
    for _ in range(10):
        dst.copy_(src)
    end.record(stream)
    torch.cuda.synchronize(device)
    return round(2 * 10 * src.nbytes / (start.elapsed_time(end) / 1e3) / 1e9, 1)


def engine_iterations(llm: Any, embeds: list[Any], device: torch.device, tokens: int = 24) -> dict[str, Any]:
    """The in-flight engine's loop at len(embeds) rows: ms per iteration with the real decoding step and with the
    step replaced by fixed logits (what is left is the engine's own host work: admission, bookkeeping, sampling's
    read-back, token acceptance, detokenising and emitting for streams), and, on CUDA, device-to-host syncs per
    iteration (torch's sync debug mode counts each)."""
    import threading
    import warnings

    from blip2_triton.llm import Job
    from blip2_triton.requests import GenerationRequest

    runner = llm.runner
    token = next(t for t in range(10, 10**6) if t not in llm.eos_token_ids)

    def run(*, fake: bool, streaming: bool, count_syncs: bool) -> dict[str, Any]:
        stamps: list[float] = []
        # Graphs captured first, as served: a capture's syncs and time must not land in the measured gaps.
        engine = captured_engine(llm, on_iteration=lambda: stamps.append(time.perf_counter()))
        if fake:
            # Only as wide as the token: the arg-max over a real vocabulary is device work, not the engine's.
            logits = torch.zeros(len(embeds), token + 1, device=device, dtype=torch.float32)
            logits[:, token] = 1.0
            runner.decode = lambda batch: logits[: len(batch)]  # type: ignore[method-assign]
        left = threading.Semaphore(0)
        jobs = [Job(request=GenerationRequest(query_embeds=e, max_tokens=tokens),
                    on_piece=(lambda _: None) if streaming else None, on_done=lambda _: left.release())
                for e in embeds]
        syncs = 0
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if count_syncs:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    engine.submit(jobs)
                    for _ in jobs:
                        if not left.acquire(timeout=300):
                            raise TimeoutError("the in-flight engine did not finish its rows in 300 s")
                finally:
                    if count_syncs:
                        torch.cuda.set_sync_debug_mode("default")
                syncs = sum("synchroniz" in str(w.message) for w in caught)
        finally:
            engine.stop()
            if fake:
                del runner.decode  # the instance attribute hid the method
        # The first gap holds the prefill of every row; the rest are decoding iterations (idle ticks come after).
        gaps = sorted(b - a for a, b in itertools.pairwise(stamps))[: tokens - 2]
        out = {"iterations": tokens - 1, "ms_median": round(statistics.median(gaps) * 1e3, 3),
               "ms_p90": round(gaps[int(0.9 * (len(gaps) - 1))] * 1e3, 3)}
        if count_syncs:
            out["syncs_per_iteration"] = round(syncs / tokens, 2)
        return out

    run(fake=False, streaming=False, count_syncs=False)  # warm-up at this batch size
    cuda = device.type == "cuda"
    return {"rows": len(embeds), "real_step": run(fake=False, streaming=False, count_syncs=cuda),
            "host_only": run(fake=True, streaming=False, count_syncs=cuda),
            "host_only_streaming": run(fake=True, streaming=True, count_syncs=False)}


def graphs_comparison(vision: Any, loaded: Any, images: Any, device: torch.device, args: Any,
                      deadline: float, report: Report) -> dict[str, Any]:
    """Every LLM figure of the CUDA-graph issue with the eager forward (`off`) and on fixed buffers (`on`), images
    through a vision stage of the same mode; each written into `report["graphs"]` as soon as measured, a failing
    one as its error."""
    import dataclasses

    from blip2_triton.llm import InflightEngine, LanguageStage
    from blip2_triton.requests import ImageRequest
    from blip2_triton.vision import VisionStage
    from blip2_triton.vision.graphs import BATCH_BUCKETS as VISION_BUCKETS

    out: dict[str, Any] = {"copy_gbps": copy_bandwidth_gbps(device)}

    def figure(result: dict[str, Any], key: str, measure: Callable[[], Any]) -> None:
        try:
            result[key] = measure()
        except Exception as e:
            result[key] = failure(e)
        report["graphs"] = out

    def capture(llm: Any) -> dict[str, Any]:
        # The served stage's start: every bucket of an engine's batch at the default limits.
        engine = InflightEngine(llm)
        try:
            t = time.perf_counter()
            count = engine.capture_graphs()
            return {"graphs": count, "seconds": round(time.perf_counter() - t, 2),
                    "graph_bytes": engine.batch.graph_bytes, "kv_bytes": engine.batch.nbytes}
        finally:
            engine.stop()  # also when the capture fails

    lm_bytes = sum(p.numel() * p.element_size() for p in loaded.model.language_model.parameters())
    out["llm_weight_bytes"] = lm_bytes
    config = loaded.config.text_config
    kv_per_position = 2 * config.num_hidden_layers * config.hidden_size * torch.finfo(loaded.dtype).bits // 8
    rows_list = [int(v) for v in args.graph_rows.split(",")]
    cached_list = [int(v) for v in args.graph_cached.split(",")]
    if out["copy_gbps"]:
        bytes_per_s = out["copy_gbps"] * 1e9
        out["decode_floor_ms"] = {f"rows_{r}_cached_{c}": round((lm_bytes + r * c * kv_per_position) / bytes_per_s
                                                               * 1e3, 3) for r in rows_list for c in cached_list}
    embeds = vision.run([ImageRequest(b) for b in images(max([*rows_list, 32]))])
    base_options = dataclasses.replace(_options(loaded), max_prompt_tokens=512)

    def mode_figures(vision: Any, llm: Any) -> list[tuple[str, Callable[[], Any]]]:
        vqa = "Question: which city is this? Answer:"
        return [
            ("capture", lambda: capture(llm)),
            ("greedy_vs_hf", lambda: greedy_against_hf(vision, llm, loaded, images(2), args.tokens, device)),
            ("decode_step_ms", lambda: {f"rows_{r}_cached_{c}": step_ms(llm, embeds, r, c, device)
                                        for r in rows_list for c in cached_list}),
            ("request_16_tokens", lambda: _percentiles(served_latency(vision, llm, images, None, 16,
                                                                      args.latency_runs))),
            ("vqa_3_tokens", lambda: _percentiles(served_latency(vision, llm, images, vqa, 3, args.latency_runs))),
            *((f"captions_c{c}", lambda c=c: captions_in_flight(vision, llm, images, c, 16, rounds=2))
              for c in (int(v) for v in args.graph_clients.split(","))),
            ("llm_mixed_c32", lambda: static_vs_inflight(llm, embeds[:32], 32, args.mixed_rounds or 2, device)),
            ("seeded_alone_equals_batch_of_32", lambda: seeded_alone_vs_batch(llm, embeds[:32])),
            ("engine_iteration", lambda: engine_iterations(llm, embeds[:32], device)),
        ]

    # The never-measured mode first: if the budget runs short, the eager figures (measured before) are the ones cut.
    for mode in ("on", "off"):
        if time.perf_counter() > deadline:
            out["skipped"] = f"stopped before mode {mode} (--budget-s)"
            break
        result: dict[str, Any] = {}
        out[mode] = result
        try:
            llm = LanguageStage(dataclasses.replace(base_options, cuda_graphs=mode), loaded=loaded)
            # The switch governs both stages as served: the end-to-end figures (the 3-token VQA case's target
            # includes the vision stage) need the vision forward of the same mode, its buckets captured before
            # any client thread runs it.
            mode_vision = VisionStage(dataclasses.replace(_options(loaded), cuda_graphs=mode), loaded=loaded)
            mode_vision.warm_up(VISION_BUCKETS[-1])
        except Exception as e:  # its error stands for the mode; the other mode still runs
            result.update(failure(e))
            report["graphs"] = out
            continue
        result["runner"] = type(llm.runner).__name__
        result["vision_fixed_buffers"] = mode_vision.fixed is not None
        figures = mode_figures(mode_vision, llm)
        for key, measure in figures:
            if time.perf_counter() > deadline:
                result["skipped"] = f"from {key} on (--budget-s)"
                break
            figure(result, key, measure)
    return out


def vision_graphs_comparison(vision: Any, loaded: Any, images: Any, device: torch.device, batches: list[int],
                             runs: int) -> dict[str, Any]:
    """The vision forward per image, eager against fixed buffers per batch bucket, and how far their embeddings
    differ, on the same decoded pixels."""
    import dataclasses

    from blip2_triton.requests import ImageRequest
    from blip2_triton.vision import VisionStage

    rows = max([*batches, 5])
    pixels = torch.stack([vision.prepare(ImageRequest(b)) for b in images(rows)])
    t = time.perf_counter()
    fixed = VisionStage(dataclasses.replace(_options(loaded), cuda_graphs="on"), loaded=loaded)
    fixed.warm_up(max(batches))
    out: dict[str, Any] = {"graphs": bool(fixed.fixed and fixed.fixed.graphs), "graph_bytes": fixed.graph_bytes,
                           "capture_s": round(time.perf_counter() - t, 2)}
    for mode, stage in (("off", vision), ("on", fixed)):
        result: dict[str, Any] = {}
        for n in batches:
            stage.embed_pixels(pixels[:n])  # warm-up: kernel selection at this shape
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                stage.embed_pixels(pixels[:n])
                times.append(time.perf_counter() - t)
            result[f"batch_{n}"] = {**_percentiles(times),
                                    "ms_per_image": round(statistics.median(times) * 1e3 / n, 3)}
        out[mode] = result
    out["on_over_off_per_image"] = {
        f"batch_{n}": round(out["on"][f"batch_{n}"]["ms_per_image"] / out["off"][f"batch_{n}"]["ms_per_image"], 3)
        for n in batches}
    diffs: dict[str, float] = {}
    largest = 0.0
    for n in sorted({*batches, 5}):
        eager = vision.embed_pixels(pixels[:n])
        diffs[f"batch_{n}"] = float(abs(fixed.embed_pixels(pixels[:n]) - eager).max())
        largest = max(largest, float(abs(eager).max()))
    out["max_abs_diff_vs_eager"] = diffs
    out["max_abs_embedding"] = largest
    return out


def _options(loaded: Any) -> Any:
    from blip2_triton.options import ServerOptions

    dtype_name = str(loaded.dtype).removeprefix("torch.")
    return ServerOptions(dtype=dtype_name, device=loaded.device.type, embedding_cache_bytes=0)


def step_ms(llm: Any, embeds: list[Any], rows: int, cached: int, device: torch.device, steps: int = 12) -> float:
    """Median ms of one decoding step of the runner's own batch state, `rows` rows holding ~`cached` positions."""
    from blip2_triton.requests import GenerationRequest

    words = max(0, cached - llm.num_query_tokens - 8)
    prompt = "Question: " + "what " * words + "is it? Answer:"
    seqs = [llm.prepare(GenerationRequest(query_embeds=embeds[i % len(embeds)], prompt=prompt, max_tokens=steps + 1))
            for i in range(rows)]
    return round(statistics.median(_step_times(llm, seqs, steps, device)[2:]) * 1e3, 3)


def _step_times(llm: Any, seqs: list[Any], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` decoding steps of `seqs` on the runner's own batch state, after their prefill."""
    with torch.inference_mode():
        prefilled = llm.runner.prefill(seqs)
        batch = llm.runner.new_batch(max_rows=len(seqs))
        tokens = prefilled.logits.argmax(-1).tolist()
        times = []
        for step in range(steps + 1):
            for seq, token in zip(seqs, tokens, strict=True):
                seq.generated.append(token)
                seq.next_token = token
            if step == 0:
                batch.merge(seqs, prefilled)
                continue
            batch.begin_step()
            _sync(device)
            t = time.perf_counter()
            tokens = llm.runner.decode(batch).argmax(-1).tolist()  # the one read back every scheduler makes
            times.append(time.perf_counter() - t)
    return times


def served_latency(vision: Any, llm: Any, images: Any, prompt: str | None, tokens: int, runs: int) -> list[float]:
    """One request at a time as served: a new image through the vision stage, then the in-flight engine."""
    from blip2_triton.llm import InflightEngine
    from blip2_triton.requests import GenerationRequest, ImageRequest

    engine = InflightEngine(llm)
    times: list[float] = []
    try:
        for i, image in enumerate(images(runs + 2)):
            t = time.perf_counter()
            (emb,) = vision.run([ImageRequest(image)])
            engine_call(engine, GenerationRequest(query_embeds=emb, prompt=prompt, max_tokens=tokens), 300)
            if i >= 2:  # warm-up: the first requests capture graphs and pick kernels
                times.append(time.perf_counter() - t)
    finally:
        engine.stop()
    return times


def captions_in_flight(vision: Any, llm: Any, images: Any, clients: int, tokens: int, rounds: int) -> dict[str, Any]:
    """`clients` closed-loop clients, each a new image through the vision stage and then the in-flight engine."""
    import threading

    from blip2_triton.requests import GenerationRequest, ImageRequest

    engine = captured_engine(llm)  # as the served stage starts: no capture falls in the measured window
    latencies: list[float] = []
    lock = threading.Lock()
    work = [images(1)[0] for _ in range(clients * rounds)]

    def client(mine: list[bytes]) -> None:
        for image in mine:
            t = time.perf_counter()
            (emb,) = vision.run([ImageRequest(image)])
            engine_call(engine, GenerationRequest(query_embeds=emb, max_tokens=tokens), 600)
            with lock:
                latencies.append(time.perf_counter() - t)

    try:
        client(work[:2])  # warm-up
        t = time.perf_counter()
        threads = [threading.Thread(target=client, args=(work[i::clients],)) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t
    finally:
        engine.stop()
    n = len(work)
    ordered = sorted(latencies[2:])
    return {"requests_per_s": round(n / elapsed, 2), "tokens_per_s": round(n * tokens / elapsed, 1),
            "p50_ms": round(ordered[len(ordered) // 2] * 1e3, 1),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, 1)}


@torch.inference_mode()
def greedy_against_hf(vision: Any, llm: Any, loaded: Any, images: list[bytes], tokens: int,
                      device: torch.device) -> list[dict[str, Any]]:
    """The served greedy tokens against HF `generate` on the same weights, dtype and device, per image and prompt;
    where they differ, the first divergent position and HF's top-2 logit margin there."""
    from PIL import Image

    from blip2_triton.llm.engine import run_static
    from blip2_triton.requests import GenerationRequest, ImageRequest

    results = []
    for image in images:
        for prompt in (None, "Question: what is in the picture? Answer:"):
            (emb,) = vision.run([ImageRequest(image)])
            ((job, _),) = run_static(llm, [GenerationRequest(query_embeds=emb, prompt=prompt, max_tokens=tokens)])
            served = job.seq.generated
            inputs = loaded.processor(images=Image.open(io.BytesIO(image)).convert("RGB"), text=prompt,
                                      return_tensors="pt").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
            out = loaded.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens,
                                        output_scores=True, return_dict_in_generate=True)
            width = inputs["input_ids"].shape[1] if "input_ids" in inputs else len(job.seq.prompt_ids)
            hf = out.sequences[0, width:].tolist()
            entry: dict[str, Any] = {"prompt": prompt, "equal": served == hf}
            if served != hf:
                at = next((i for i, (a, b) in enumerate(zip(served, hf, strict=False)) if a != b),
                          min(len(served), len(hf)))
                top2 = out.scores[min(at, len(out.scores) - 1)][0].float().topk(2).values
                entry.update(first_divergent_position=at, hf_top2_margin=round(float(top2[0] - top2[1]), 4))
            results.append(entry)
    return results


def seeded_alone_vs_batch(llm: Any, embeds: list[Any]) -> bool:
    from blip2_triton.requests import GenerationRequest

    def sampled() -> Any:
        return GenerationRequest(query_embeds=embeds[0], max_tokens=12, temperature=0.8, top_p=0.9, seed=11)

    alone = llm.run([sampled()])[0]
    batch = llm.run([GenerationRequest(query_embeds=e, max_tokens=12) for e in embeds[1:32]] + [sampled()])
    return bool(batch[-1] == alone)


@torch.inference_mode()
def hf_generate_latency(loaded: Any, image: bytes, tokens: int, device: torch.device, runs: int) -> dict[str, Any]:
    """The reference path on the same weights: processor + `Blip2ForConditionalGeneration.generate`; its
    latency, and its text for `image`."""
    from PIL import Image

    processor, model = loaded.processor, loaded.model
    times = []
    ids = None
    for i in range(runs + 1):
        t = time.perf_counter()
        inputs = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
        ids = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens)
        _sync(device)
        if i:  # the first call is warm-up
            times.append(time.perf_counter() - t)
    assert ids is not None
    prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else model.config.num_query_tokens + 1
    text = processor.batch_decode(ids[:, prompt:], skip_special_tokens=True)[0].strip()
    return {**_percentiles(times), "text": text}


if __name__ == "__main__":
    main()
