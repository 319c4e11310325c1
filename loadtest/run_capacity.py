"""One-command capacity test: (start a local server,) run the step load headless, write the report, (stop it).

python -m loadtest.run_capacity                                   # local tiny model on free ports
python -m loadtest.run_capacity --host http://10.0.0.5:8000       # remote server, gRPC :8001, metrics :8002
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # Allows `python loadtest/run_capacity.py` as well as `python -m loadtest.run_capacity`.
    sys.path.insert(0, str(ROOT))

from loadtest import report as capacity_report  # noqa: E402
from loadtest.shapes import fixed_plan, step_plan, total_duration  # noqa: E402

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
USER_CLASSES = {"grpc": ["Blip2GrpcUser"], "http": ["Blip2HttpUser"], "both": ["Blip2GrpcUser", "Blip2HttpUser"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a step (or fixed) Locust load against BLIP-2 on Triton and write a capacity report.",
        epilog="Arguments after `--` are passed to locust unchanged.",
    )
    target = parser.add_argument_group("target (omit --host to start a local server with the embedded tiny model)")
    target.add_argument("--host", help="HTTP base URL of a running server, e.g. http://10.0.0.5:8000")
    target.add_argument("--grpc-url", default="", help="host:port (default: --host's hostname, port 8001)")
    target.add_argument("--metrics-url", default="", help="default: http://<--host hostname>:8002/metrics")
    target.add_argument("--model-id", default=None, help="local server only: BLIP2_MODEL_ID (default: tiny model)")
    target.add_argument("--device", default=None, help="local server only: BLIP2_DEVICE (auto|cuda|cpu)")
    load = parser.add_argument_group("load")
    load.add_argument("--protocol", choices=sorted(USER_CLASSES), default="both", help="which Locust users to run")
    load.add_argument("--mode", choices=["step", "fixed"], default="step")
    load.add_argument("--step-users", type=int, default=8)
    load.add_argument("--step-duration", type=float, default=30.0)
    load.add_argument("--max-steps", type=int, default=4)
    load.add_argument("--fixed-users", type=int, default=16)
    load.add_argument("--fixed-duration", type=float, default=300.0)
    load.add_argument("--fixed-interval", type=float, default=60.0)
    load.add_argument("--warmup", type=float, default=5.0)
    load.add_argument("--vqa-ratio", type=float, default=0.5)
    load.add_argument("--repeat-ratio", type=float, default=0.0, help="share of requests resending identical bytes")
    load.add_argument("--max-tokens", type=int, default=0, help="0 = omit, server default (30) applies")
    load.add_argument("--image-dir", default="", help="default: generated set of varied sizes and formats")
    load.add_argument("--prompts-file", default="")
    load.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("report")
    out.add_argument("--out", type=Path, default=None, help="default: loadtest/reports/capacity-<timestamp>")
    out.add_argument("--slo-ms", type=float, default=None, help="latency target for the summary")
    out.add_argument("--slo-percentile", type=int, default=95, choices=capacity_report.PERCENTILES)
    parser.add_argument("locust_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.locust_args and args.locust_args[0] == "--":
        args.locust_args = args.locust_args[1:]
    return args


def schedule_seconds(args: argparse.Namespace) -> float:
    if args.mode == "fixed":
        return total_duration(fixed_plan(args.fixed_users, args.fixed_duration, args.fixed_interval, args.warmup))
    return total_duration(step_plan(args.step_users, args.step_duration, args.max_steps, args.warmup))


def locust_command(args: argparse.Namespace, urls: dict[str, str], run_data: Path, out_dir: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "--only-summary",
        "--host", urls["http"],
        "--load-mode", args.mode,
        "--step-users", str(args.step_users),
        "--step-duration", str(args.step_duration),
        "--max-steps", str(args.max_steps),
        "--fixed-users", str(args.fixed_users),
        "--fixed-duration", str(args.fixed_duration),
        "--fixed-interval", str(args.fixed_interval),
        "--warmup", str(args.warmup),
        "--vqa-ratio", str(args.vqa_ratio),
        "--repeat-ratio", str(args.repeat_ratio),
        "--max-tokens", str(args.max_tokens),
        "--seed", str(args.seed),
        "--run-data", str(run_data),
        "--logfile", str(out_dir / "locust.log"),
    ]  # fmt: skip
    for option, value in (("--grpc-url", urls.get("grpc")), ("--metrics-url", urls.get("metrics")),
                          ("--image-dir", args.image_dir), ("--prompts-file", args.prompts_file)):  # fmt: skip
        if value:
            cmd += [option, value]
    return cmd + list(args.locust_args) + USER_CLASSES[args.protocol]


@contextlib.contextmanager
def target(args: argparse.Namespace, out_dir: Path) -> Iterator[dict[str, str]]:
    if args.host:
        yield {"http": args.host, "grpc": args.grpc_url, "metrics": args.metrics_url}
        return
    # Imported here so a remote capacity test needs only the load-test dependencies, not torch/transformers.
    from blip2_triton.supervisor import LaunchSettings, TritonServer

    settings = LaunchSettings.on_free_ports(model_id=args.model_id,
                                            options={"device": args.device} if args.device else {})
    print(f"starting tritonserver (log: {out_dir / 'tritonserver.log'})", file=sys.stderr)
    with TritonServer(settings, log_path=out_dir / "tritonserver.log") as server:
        yield {"http": server.http_url, "grpc": server.grpc_url, "metrics": server.metrics_url}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = (args.out or ROOT / "loadtest" / "reports" / f"capacity-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    run_data = out_dir / "run.json"
    seconds = schedule_seconds(args)
    with target(args, out_dir) as urls:
        cmd = locust_command(args, urls, run_data, out_dir)
        print(f"running {args.protocol} load for {seconds:.0f} s against {urls['http']}", file=sys.stderr)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with (out_dir / "locust_summary.txt").open("w") as summary:
            proc = subprocess.Popen(cmd, stdout=summary, stderr=subprocess.STDOUT, env=env)
            try:
                # Locust stops itself when the schedule ends; the timeout only guards against a wedged run.
                returncode = proc.wait(timeout=seconds + 180)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print("locust overran its schedule and was killed", file=sys.stderr)
                returncode = 1
    if not run_data.exists():
        print(f"locust exited with {returncode} and wrote no run data; see {out_dir}", file=sys.stderr)
        return returncode or 1
    result = capacity_report.generate(run_data, out_dir, args.slo_ms, args.slo_percentile)
    print(capacity_report.format_table(result))
    summary_fields = result["summary"]
    print(
        f"peak {summary_fields.get('max_throughput_infer_per_sec', 0):.2f} infer/s at concurrency "
        f"{summary_fields.get('max_throughput_concurrency')}; failures: {summary_fields.get('total_failures')}"
    )
    print(f"report: {out_dir}", file=sys.stderr)
    # Locust exits 1 when any request failed: keep that so CI and scripts notice.
    return returncode


if __name__ == "__main__":
    sys.exit(main())
