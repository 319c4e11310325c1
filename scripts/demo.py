"""Serves the embedded default BLIP-2 (the trained scenes model) on Triton, draws a scene it never saw and prints
the caption and answers the server gives, each checked against what was drawn."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from blip2_client import Blip2Client

from blip2_triton.scenes import make_scene, random_held_out_seed, save_scene
from blip2_triton.supervisor import LaunchSettings, TritonServer

QUESTIONS = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="scene seed (default: a random held-out one)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "blip2-demo-scene.png")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random_held_out_seed()
    scene = make_scene(seed)
    save_scene(scene, args.out, scale=8)
    log = Path(tempfile.gettempdir()) / "blip2-demo-tritonserver.log"
    print(f"starting tritonserver with the embedded default BLIP-2 (log: {log}) ...", flush=True)
    wrong = 0
    with TritonServer(LaunchSettings.on_free_ports(), log_path=log) as server:
        print(f"ready: http={server.http_url} grpc={server.grpc_url}")
        print(f"scene: {args.out} (seed {seed})")
        with Blip2Client(server.grpc_url, protocol="grpc") as client:
            checks = [(None, scene.caption), *scene.qa[:QUESTIONS]]
            for question, expected in checks:
                text = client.ask(args.out, question) if question else client.caption(args.out)
                wrong += text != expected
                verdict = "(correct)" if text == expected else f"(WRONG: the scene says {expected!r})"
                print(f"{question or 'caption:'} {text}  {verdict}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
