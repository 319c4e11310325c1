"""Image decoding and preprocessing, the vision stage's host work before the forward pass (issue 22).

    .venv/bin/python bench/bench_preprocess.py --output docs/benchmark/preprocess_<commit>.json
    .venv/bin/python bench/bench_preprocess.py --quick      # smoke test

Photo-like JPEGs (smooth gradients plus noise, quality 90) at 224x224 and 4000x3000, with blip2-opt-2.7b's image
processor (224 px, bicubic, CLIP normalisation). Per size, the median of --runs:
  decode_ms           `vision.decode_image` (the limits checks, PIL decode, RGB)
  hf_processor_ms     the checkpoint's processor on the decoded image, as HF's reference path runs it
  served_ms           `vision.preprocess.ImagePreprocessor`, what the served stages run (bit-identical pixels)
and decoder_pool: images/s of decode + served preprocessing of the 4000x3000 JPEG on 1, 2, ... threads (up to
--threads), the pool `vision.pipeline` runs beside the forward pass. PIL releases the GIL while it decodes and
resizes, so the pool scales with cores.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_throughput import Report
from PIL import Image

from blip2_triton.options import ServerOptions
from blip2_triton.requests import ImageRequest
from blip2_triton.tiny import clip_image_processor
from blip2_triton.vision import decode_image
from blip2_triton.vision.preprocess import ImagePreprocessor

SIZES = ((224, 224), (4000, 3000))


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.int16)
    noise = np.random.default_rng(seed).integers(-8, 8, size=base.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _median_ms(call: Callable[[], Any], runs: int) -> float:
    call()  # warm-up: first-call imports and allocations
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def per_image(processor: Any, data: bytes, runs: int) -> dict[str, Any]:
    options = ServerOptions()
    preprocess = ImagePreprocessor(processor)
    image = decode_image(ImageRequest(data), options)
    decode = _median_ms(lambda: decode_image(ImageRequest(data), options), runs)
    hf = _median_ms(lambda: processor([image], return_tensors="pt")["pixel_values"][0], runs)
    served = _median_ms(lambda: preprocess(image), runs)
    return {"jpeg_bytes": len(data), "decode_ms": decode, "hf_processor_ms": hf, "served_ms": served,
            "decode_and_hf_ms": round(decode + hf, 2), "decode_and_served_ms": round(decode + served, 2),
            "speedup": round((decode + hf) / (decode + served), 2), "direct_resize": preprocess.direct}


def decoder_pool(processor: Any, data: bytes, threads: int, images_per_thread: int) -> float:
    """Images/s of `threads` threads each decoding and preprocessing `images_per_thread` images."""
    options = ServerOptions()
    preprocess = ImagePreprocessor(processor)

    def work() -> None:
        for _ in range(images_per_thread):
            preprocess(decode_image(ImageRequest(data), options))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return round(threads * images_per_thread / (time.perf_counter() - start), 2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="largest decoder pool measured")
    p.add_argument("--pool-images", type=int, default=6, help="images per thread in the decoder_pool figures")
    p.add_argument("--quick", action="store_true", help="a smoke test: small images, few runs")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    processor = clip_image_processor(224)
    sizes = ((224, 224), (640, 480)) if args.quick else SIZES
    runs, pool_images = (2, 2) if args.quick else (args.runs, args.pool_images)
    report = Report(args.output, cpus=os.cpu_count(), processor=type(processor).__name__)
    jpegs = {f"{w}x{h}": photo_jpeg(w, h) for w, h in sizes}
    for name, data in jpegs.items():
        report[name] = per_image(processor, data, runs)
    largest = jpegs[f"{sizes[-1][0]}x{sizes[-1][1]}"]
    counts = sorted({1, *(n for n in (2, 4, 8, 16) if n <= args.threads), args.threads})
    report["decoder_pool"] = {"image": f"{sizes[-1][0]}x{sizes[-1][1]}",
                              **{f"threads_{n}_images_per_s": decoder_pool(processor, largest, n, pool_images)
                                 for n in counts}}
    report.finish()
    return report


if __name__ == "__main__":
    main()
