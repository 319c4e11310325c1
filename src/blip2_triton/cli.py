"""`blip2-triton`: serve the BLIP-2 model repository, or write the tiny test checkpoint."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .options import DEVICES, DTYPES, QUANTIZATIONS


def _absolute_if_local(model_id: str | None) -> str | None:
    # Stage processes do not run in the caller's directory: relative checkpoint paths must not reach them.
    if model_id and Path(model_id).expanduser().exists():
        return str(Path(model_id).expanduser().resolve())
    return model_id


def _serve(args: argparse.Namespace) -> int:
    from .launcher import LauncherError, StartupInterruptedError, TritonServer
    from .watchdog import FAULT_EXIT_CODE, _exit_status

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
        watchdog=not args.no_watchdog,
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def failure_code() -> int:
        if server.fault:
            return FAULT_EXIT_CODE
        code = server.process.returncode if server.process is not None else None
        return code if code is not None and code > 0 else 1

    # Supervisor loop: every pass starts tritonserver and waits for a signal (drain and exit) or for the server
    # to end (the watchdog killed it, or it crashed): restart within the budget, else exit non-zero.
    restarts: list[float] = []
    while True:
        try:
            server.start(interrupt=stop)
            print(
                f"blip2-triton: ready  http={server.http_url}  grpc={server.grpc_url}  metrics={server.metrics_url}",
                file=sys.stderr,
                flush=True,
            )
        except StartupInterruptedError:
            print("blip2-triton: stopped during startup", file=sys.stderr, flush=True)
            return 0
        except LauncherError as e:
            print(f"blip2-triton: {e}", file=sys.stderr, flush=True)
            if server.process is None or (not restarts and not args.max_restarts):
                # No process at all (no tritonserver or stub found): restarting cannot help.
                return 1
        process = server.process
        while not stop.is_set() and process.poll() is None:
            stop.wait(0.2)
        if process.poll() is None:
            print("blip2-triton: stopping (draining in-flight requests)", file=sys.stderr, flush=True)
            code = server.stop()
            return 0 if code in (0, -signal.SIGTERM) else _exit_status(int(code or 1))
        reason = server.fault or f"tritonserver exited with code {process.returncode}"
        print(f"blip2-triton: {reason}", file=sys.stderr, flush=True)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < args.restart_window_s]
        if stop.is_set() or len(restarts) >= args.max_restarts:
            if args.max_restarts and not stop.is_set():
                print(f"blip2-triton: {len(restarts)} restarts within {args.restart_window_s:.0f} s; giving up",
                      file=sys.stderr, flush=True)
            server.stop()
            return failure_code()
        restarts.append(now)
        print(f"blip2-triton: restarting tritonserver ({len(restarts)}/{args.max_restarts} within "
              f"{args.restart_window_s:.0f} s)", file=sys.stderr, flush=True)
        # A server that fails at once would otherwise spin through its restarts in seconds.
        if stop.wait(min(2.0 ** (len(restarts) - 1), 30.0)):
            server.stop()
            return failure_code()


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
    serve.add_argument("--host", default="0.0.0.0", help="address to bind HTTP and gRPC to")  # noqa: S104
    serve.add_argument("--model-repository", default=None)
    serve.add_argument("--exit-timeout-secs", type=int, default=30)
    serve.add_argument("--startup-timeout-s", type=float, default=1800.0)
    serve.add_argument("--max-restarts", type=int, default=0,
                       help="restart tritonserver when it dies or a stage's stub process dies, at most this many "
                            "times within --restart-window-s (default 0: exit with an error and let the "
                            "orchestrator restart the replica)")
    serve.add_argument("--restart-window-s", type=float, default=600.0)
    serve.add_argument("--no-watchdog", action="store_true",
                       help="do not watch the stage stub processes (a dead stub then fails requests until restart)")
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
