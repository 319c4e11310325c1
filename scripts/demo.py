"""Serves the embedded default BLIP-2 on Triton and fetches one caption and one answer through it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from blip2_client import Blip2Client

from blip2_triton.supervisor import LaunchSettings, TritonServer

IMAGE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "shapes.jpg"


def main() -> None:
    log = Path(tempfile.gettempdir()) / "blip2-demo-tritonserver.log"
    print(f"starting tritonserver with the embedded default BLIP-2 (log: {log}) ...", flush=True)
    with TritonServer(LaunchSettings.on_free_ports(), log_path=log) as server:
        print(f"ready: http={server.http_url} grpc={server.grpc_url}")
        print(f"image:   {IMAGE.relative_to(Path.cwd()) if IMAGE.is_relative_to(Path.cwd()) else IMAGE}")
        with Blip2Client(server.grpc_url, protocol="grpc") as client:
            print("caption:", client.caption(IMAGE, max_tokens=8))
            print("answer: ", client.ask(IMAGE, "what shapes are there?", max_tokens=8))


if __name__ == "__main__":
    main()
