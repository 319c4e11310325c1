"""Standalone front: `python -m blip2_triton.front --triton-http 127.0.0.1:18000 --triton-grpc 127.0.0.1:18001
--http-port 8000 --grpc-port 8001`. Serves until SIGTERM or SIGINT, then drains (`--shutdown-grace-s`)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from ..errors import ConfigurationError
from ..logs import configure_logging
from .server import Front, FrontStartupError
from .settings import add_arguments, from_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_triton.front",
        description="HTTP/gRPC front and OpenAI-compatible gateway in front of Triton (docs/GATEWAY.md). "
                    "API keys are read from BLIP2_FRONT_API_KEYS only.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = from_arguments(args)
    except ConfigurationError as e:
        parser.error(str(e))
    configure_logging(settings.log_format, settings.log_level)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    front = Front(settings)
    try:
        front.start()
    except FrontStartupError as e:
        print(f"blip2-front: {e}", file=sys.stderr)
        return 1
    stop.wait()
    front.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
