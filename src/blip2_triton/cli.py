"""`blip2-triton`: serve the BLIP-2 model repository, or write the tiny test checkpoint."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .options import DEVICES, DTYPES, QUANTIZATIONS


def _absolute_if_local(model_id: str | None) -> str | None:
    # Stage processes do not run in the caller's directory: relative checkpoint paths must not reach them.
    if model_id and Path(model_id).expanduser().exists():
        return str(Path(model_id).expanduser().resolve())
    return model_id


def _serve(args: argparse.Namespace) -> int:
    from .launcher import LauncherError, TritonServer

    server = TritonServer(
        model_repository=args.model_repository,
        model_id=_absolute_if_local(args.model_id),
        with_t5=args.t5,
        t5_model_id=_absolute_if_local(args.t5_model_id),
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        exit_timeout_s=args.exit_timeout_secs,
        startup_timeout_s=args.startup_timeout_s,
        extra_args=args.triton_args,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except LauncherError as e:
        print(f"blip2-triton: {e}", file=sys.stderr)
        return 1
    print(
        f"blip2-triton: ready  http={server.http_url}  grpc={server.grpc_url}  metrics={server.metrics_url}",
        file=sys.stderr,
        flush=True,
    )
    assert server.process is not None
    while not stop.is_set() and server.process.poll() is None:
        stop.wait(0.5)
    if server.process.poll() is not None:
        print(f"blip2-triton: tritonserver exited with code {server.process.returncode}", file=sys.stderr)
        return server.process.returncode or 1
    print("blip2-triton: stopping (draining in-flight requests)", file=sys.stderr, flush=True)
    code = server.stop()
    return 0 if code in (0, -signal.SIGTERM) else int(code or 1)


def _tiny_model(args: argparse.Namespace) -> int:
    from .tiny import write_tiny_model

    print(write_tiny_model(args.out_dir, family=args.family, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start tritonserver on the BLIP-2 model repository")
    serve.add_argument("--model-id", default=None,
                       help="HF repo id or local checkpoint dir (default: the embedded tiny model)")
    serve.add_argument("--t5", action="store_true",
                       help="also serve the FlanT5 ensemble `blip2_t5` (default: the embedded tiny FlanT5 model)")
    serve.add_argument("--t5-model-id", default=None,
                       help="FlanT5 BLIP-2 checkpoint for `blip2_t5` (implies --t5)")
    serve.add_argument("--dtype", choices=DTYPES, default=None)
    serve.add_argument("--device", choices=DEVICES, default=None)
    serve.add_argument("--quantization", choices=QUANTIZATIONS, default=None)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--host", default="0.0.0.0", help="address to bind HTTP and gRPC to")
    serve.add_argument("--model-repository", default=None)
    serve.add_argument("--exit-timeout-secs", type=int, default=30)
    serve.add_argument("--startup-timeout-s", type=float, default=1800.0)
    serve.add_argument("triton_args", nargs="*", help="extra tritonserver arguments, after `--`")
    serve.set_defaults(func=_serve)
    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight BLIP-2 checkpoint (OPT or FlanT5)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", choices=("opt", "t5"), default="opt")
    tiny.add_argument("--seed", type=int, default=1234)
    tiny.set_defaults(func=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
