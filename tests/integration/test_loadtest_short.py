"""A short real Locust run (gRPC + HTTP users, 16 then 32 users, 32 s) against tritonserver, then its report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest import report  # noqa: E402

pytestmark = pytest.mark.integration

STAGES = ("blip2_vision", "blip2_llm")
STEP_USERS, STEPS, STEP_S, WARMUP_S = 16, 2, 16, 4


def batched_executions(http_url: str) -> dict[str, int] | None:
    """Executions with batch size > 1 per stage model, from Triton's own statistics (None if unreachable)."""
    client = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
    counts = {}
    try:
        for model in STAGES:
            stats = client.get_inference_statistics(model)["model_stats"]
            counts[model] = sum(
                b["compute_infer"]["count"] for s in stats for b in s.get("batch_stats", []) if b["batch_size"] > 1
            )
    except Exception:  # a server that died under load is reported by the tests, not here
        return None
    finally:
        client.close()
    return counts


@pytest.fixture(scope="module")
def locust_run(triton_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("loadtest")
    run_data = out / "run.json"
    batched_before = batched_executions(triton_server.http_url)
    cmd = [
        sys.executable, "-m", "locust",
        "-f", str(ROOT / "loadtest" / "locustfile.py"),
        "--headless", "--only-summary", "--loglevel", "WARNING",
        "--host", triton_server.http_url,
        "--grpc-url", triton_server.grpc_url,
        "--metrics-url", triton_server.metrics_url,
        "--load-mode", "step",
        "--step-users", str(STEP_USERS),
        "--max-steps", str(STEPS),
        "--step-duration", str(STEP_S),
        "--warmup", str(WARMUP_S),
        "--max-tokens", "6",
        "--vqa-ratio", "0.5",
        "--request-timeout", "30",
        "--run-data", str(run_data),
        "Blip2GrpcUser", "Blip2HttpUser",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=STEPS * STEP_S + 45, cwd=ROOT)
    return {
        "proc": proc,
        "run_data": run_data,
        "out": out,
        "batched_before": batched_before,
        "batched_after": batched_executions(triton_server.http_url),
    }


def test_locust_run_has_no_failures(locust_run: dict[str, Any]) -> None:
    proc = locust_run["proc"]
    run = json.loads(locust_run["run_data"].read_text())
    failed = [row for row in run["samples"] if not row[2]]
    assert not failed and not run["errors"], f"{len(failed)} failed requests: {run['errors']}"
    # Locust exits 1 when any request failed, 2 on an unhandled error in a user.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert locust_run["batched_after"] is not None, "tritonserver stopped answering after the run"
    assert {row[3] for row in run["samples"]} == {"grpc", "POST"}  # both protocols carried traffic
    assert {row[4] for row in run["samples"]} == {"caption", "vqa"}
    assert set(run["config"]["user_classes"]) == {"Blip2GrpcUser", "Blip2HttpUser"}
    assert [w["users"] for w in run["windows"]] == [STEP_USERS * (i + 1) for i in range(STEPS)]
    assert min(w["users"] for w in run["windows"]) >= 16
    assert run["windows"][-1]["end"] - run["started_at"] >= 30


def test_stage_models_executed_batches(locust_run: dict[str, Any]) -> None:
    before, after = locust_run["batched_before"], locust_run["batched_after"]
    assert before is not None and after is not None, "tritonserver unreachable"
    for model in STAGES:
        assert after[model] > before[model], f"{model} never executed a batch larger than 1"


def test_report_from_real_run(locust_run: dict[str, Any]) -> None:
    out_dir = locust_run["out"] / "report"
    result = report.generate(locust_run["run_data"], out_dir)
    steps = result["steps"]
    assert [s["concurrency"] for s in steps] == [STEP_USERS * (i + 1) for i in range(STEPS)]
    for step in steps:
        assert step["request_count"] > 0 and step["failure_count"] == 0
        assert step["throughput_infer_per_sec"] > 0
        latencies = [step[f"p{p}_latency_ms"] for p in report.PERCENTILES]
        assert all(v is not None and v > 0 for v in latencies)
        assert latencies == sorted(latencies)
        assert step["server_failure_count"] == 0
        assert step["blip2_request_success"] > 0
        for model in STAGES:
            assert step[f"{model}_server_compute_infer_us"] > 0
            assert step[f"{model}_server_queue_us"] is not None
    # Dynamic batching, seen server-side for the same windows: average executed batch size above 1.
    for model in STAGES:
        assert max(s[f"{model}_avg_batch_size"] for s in steps) > 1.0, model
    for step in steps:
        # Unique image bytes per request (the default) must keep the vision embedding cache from answering.
        if step.get("blip2_vision_cache_hit_rate") is not None:
            assert step["blip2_vision_cache_hit_rate"] < 0.05
    engine_batches = [s["blip2_llm_engine_avg_batch_size"] for s in steps if s.get("blip2_llm_engine_avg_batch_size")]
    if engine_batches:
        assert max(engine_batches) > 1.0  # in-flight batching merged concurrent generations

    with (out_dir / "capacity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == STEPS
    for column in ("concurrency", "throughput_infer_per_sec", "p50_latency_ms", "p90_latency_ms", "p95_latency_ms",
                   "p99_latency_ms", "failure_count", "server_queue_us", "server_compute_infer_us",
                   "blip2_vision_avg_batch_size", "blip2_llm_avg_batch_size", "blip2_vision_server_queue_us",
                   "blip2_llm_server_compute_infer_us"):  # fmt: skip
        assert all(float(row[column]) >= 0 for row in rows), column
    data = json.loads((out_dir / "capacity.json").read_text())
    assert len(data["steps"]) == STEPS
    assert data["summary"]["max_throughput_infer_per_sec"] > 0
    assert data["summary"]["total_failures"] == 0

    from PIL import Image

    for name in ("latency_vs_throughput.png", "batch_size_vs_load.png", "server_time_vs_load.png"):
        path = out_dir / name
        assert path.stat().st_size > 5_000, name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
            assert colours is None or len(colours) > 10, f"{name} is (nearly) one colour"
