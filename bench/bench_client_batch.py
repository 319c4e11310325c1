"""32 sequential `caption` calls versus one `caption_batch` of 32, against the same server.

    python bench/bench_client_batch.py                      # starts a server on the tiny model
    python bench/bench_client_batch.py --url localhost:8001 # an already running server

Prints wall time of both and their ratio; nothing is asserted (timings depend on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from blip2_client import Blip2Client
from PIL import Image


def make_images(n: int, size: int = 224) -> list[bytes]:
    # Distinct images, so nothing along the way can serve a repeat from a cache.
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


@contextlib.contextmanager
def local_server(model_id: str | None, protocol: str | None) -> Iterator[str]:
    # Only this path needs the server package; connecting to --url needs the client alone.
    from blip2_triton.supervisor import LaunchSettings, TritonServer

    with tempfile.TemporaryDirectory() as tmp:
        if model_id is None:
            from blip2_triton.tiny import write_tiny_model

            model_id = str(write_tiny_model(Path(tmp) / "tiny-blip2-opt"))
        server = TritonServer(LaunchSettings.on_free_ports(model_id=model_id), log_path=Path(tmp) / "tritonserver.log")
        print(f"starting tritonserver ({model_id}) ...", file=sys.stderr)
        with server:
            yield server.http_url if protocol == "http" else server.grpc_url


def run(url: str, protocol: str | None, n: int, max_tokens: int, concurrency: int, repeats: int) -> None:
    images = make_images(n)
    with Blip2Client(url, protocol=protocol, timeout_s=300, max_concurrency=concurrency) as client:
        client.wait_until_ready(300)
        # Warm-up: connections, server-side lazy init, and the thread pool.
        client.caption_batch(images[: min(n, concurrency)], max_tokens=max_tokens)

        seq_times, batch_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            sequential = [client.caption(img, max_tokens=max_tokens) for img in images]
            seq_times.append(time.perf_counter() - start)

            start = time.perf_counter()
            batched = client.caption_batch(images, max_tokens=max_tokens)
            batch_times.append(time.perf_counter() - start)
            if batched != sequential:
                print("warning: batch and sequential texts differ", file=sys.stderr)

    seq, batch = statistics.median(seq_times), statistics.median(batch_times)
    print(f"server: {url} ({client.protocol}), images: {n}, max_tokens: {max_tokens}, concurrency: {concurrency}")
    print(f"sequential caption x{n}: {seq:.3f} s  ({n / seq:.1f} images/s)")
    print(f"caption_batch of {n}:    {batch:.3f} s  ({n / batch:.1f} images/s)")
    print(f"speed-up: {seq / batch:.2f}x  (median of {repeats})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="server to use; without it a local server is started")
    parser.add_argument("--protocol", choices=["grpc", "http"], default=None)
    parser.add_argument("--model-id", help="model for the local server (default: the embedded tiny model)")
    parser.add_argument("-n", "--images", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=8, help="max_concurrency of the batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if args.url:
        run(args.url, args.protocol, args.images, args.max_tokens, args.concurrency, args.repeats)
        return
    with local_server(args.model_id, args.protocol) as url:
        run(url, args.protocol, args.images, args.max_tokens, args.concurrency, args.repeats)


if __name__ == "__main__":
    main()
