"""Serves the embedded tiny BLIP-2 on Triton and fetches one caption and one answer through it."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from blip2_client import Blip2Client
from PIL import Image

from blip2_triton.supervisor import LaunchSettings, TritonServer


def demo_image() -> bytes:
    y, x = np.mgrid[0:240, 0:320]
    rgb = np.stack([x * 255 // 319, y * 255 // 239, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    log = Path(tempfile.gettempdir()) / "blip2-demo-tritonserver.log"
    print(f"starting tritonserver with the embedded tiny BLIP-2 (log: {log}) ...", flush=True)
    with TritonServer(LaunchSettings.on_free_ports(), log_path=log) as server:
        print(f"tritonserver ready: http={server.http_url} grpc={server.grpc_url}")
        image = demo_image()
        with Blip2Client(server.grpc_url, protocol="grpc") as client:
            print("caption:", client.caption(image, max_tokens=12))
            print("answer: ", client.ask(image, "What color is the sky?", max_tokens=8))


if __name__ == "__main__":
    main()
