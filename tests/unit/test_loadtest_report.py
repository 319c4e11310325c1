from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest import prom, report  # noqa: E402

METRICS_TEXT = r"""
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="blip2",version="1"} 120
nv_inference_request_success{model="blip2_vision",version="1"} 118
nv_inference_request_success{model="blip2_vision",version="2"} 2
nv_inference_exec_count{model="blip2_llm",version="1"} 30 1700000000000
nv_gpu_utilization{gpu_uuid="GPU-a"} 0.5
weird_label{model="a \"quoted\", model",path="C:\\tmp\nx"} NaN
inf_metric +Inf
neg_inf_metric{} -Inf
"""


def test_parse_prometheus_handles_comments_labels_escapes_and_special_values() -> None:
    samples = prom.parse_prometheus(METRICS_TEXT)
    assert len(samples) == 8
    first = samples[0]
    assert (first.name, first.labels, first.value) == (
        "nv_inference_request_success",
        {"model": "blip2", "version": "1"},
        120,
    )
    exec_count = next(s for s in samples if s.name == "nv_inference_exec_count")
    assert exec_count.value == 30  # the trailing timestamp is not the value
    weird = next(s for s in samples if s.name == "weird_label")
    assert weird.labels == {"model": 'a "quoted", model', "path": "C:\\tmp\nx"}
    assert math.isnan(weird.value)
    assert next(s for s in samples if s.name == "inf_metric").value == math.inf
    assert next(s for s in samples if s.name == "neg_inf_metric").value == -math.inf


def test_by_model_sums_versions() -> None:
    samples = prom.parse_prometheus(METRICS_TEXT)
    assert prom.by_model(samples, "nv_inference_request_success") == {"blip2": 120, "blip2_vision": 120}
    assert prom.by_model(samples, "nv_gpu_utilization") == {}


def test_parse_prometheus_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        prom.parse_prometheus("not a metric line at all {")


def test_sample_json_round_trip_maps_nan_to_null() -> None:
    sample = prom.Sample("x", {"model": "m"}, math.nan)
    encoded = json.loads(json.dumps(sample.to_json()))
    assert encoded == ["x", {"model": "m"}, None]
    assert math.isnan(prom.Sample.from_json(encoded).value)


@pytest.mark.parametrize(("p", "expected"), [(50, 50.0), (90, 90.0), (95, 95.0), (99, 99.0), (100, 100.0), (0.5, 1.0)])
def test_percentile_is_nearest_rank(p: float, expected: float) -> None:
    values = list(range(100, 0, -1))  # unsorted on purpose
    assert report.percentile(values, p) == expected


def test_percentile_small_samples_and_errors() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([7.0], 99) == 7.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    with pytest.raises(ValueError):
        report.percentile([1.0], 0)


def test_latency_summary() -> None:
    summary = report.latency_summary([10.0, 20.0, 30.0, 40.0])
    assert summary["avg_latency_ms"] == 25.0
    assert summary["min_latency_ms"] == 10.0
    assert summary["max_latency_ms"] == 40.0
    assert summary["p50_latency_ms"] == 20.0
    assert summary["p99_latency_ms"] == 40.0
    assert all(v is None for v in report.latency_summary([]).values())


def test_counter_delta_missing_and_reset() -> None:
    assert report.counter_delta({"m": 10}, {"m": 25}, "m") == 15
    assert report.counter_delta({}, {"m": 25}, "m") is None
    assert report.counter_delta({"m": 10}, {}, "m") is None
    assert report.counter_delta({"m": 100}, {"m": 5}, "m") is None  # server restarted in between


def test_avg_batch_size_from_counter_deltas() -> None:
    start = {report.INFERENCES: {"v": 100, "l": 50}, report.EXECUTIONS: {"v": 60, "l": 50}}
    end = {report.INFERENCES: {"v": 140, "l": 50}, report.EXECUTIONS: {"v": 70, "l": 50}}
    assert report.avg_batch_size(start, end, "v") == 4.0
    assert report.avg_batch_size(start, end, "l") is None  # no executions in the window
    assert report.avg_batch_size(start, end, "absent") is None


# --- a synthetic run ---------------------------------------------------------------------------------------

T0 = 1_000_000.0


def _metrics(counters: dict[str, dict[str, float]], gpu: float | None = None) -> list:
    samples = [
        [name, {"model": model, "version": "1"}, value]
        for name, per_model in counters.items()
        for model, value in per_model.items()
    ]
    if gpu is not None:
        samples.append(["nv_gpu_utilization", {"gpu_uuid": "GPU-0"}, gpu])
    return samples


def _counters(n_ens: float, n_vis: float, exec_vis: float, n_llm: float, exec_llm: float, scale: float) -> dict:
    return {
        "nv_inference_request_success": {"blip2": n_ens, "blip2_vision": n_vis, "blip2_llm": n_llm},
        "nv_inference_request_failure": {"blip2": 0, "blip2_vision": 0, "blip2_llm": 0},
        "nv_inference_count": {"blip2": n_ens, "blip2_vision": n_vis, "blip2_llm": n_llm},
        "nv_inference_exec_count": {"blip2": n_ens, "blip2_vision": exec_vis, "blip2_llm": exec_llm},
        "nv_inference_request_duration_us": {"blip2": 900 * n_ens * scale, "blip2_vision": 0, "blip2_llm": 0},
        "nv_inference_queue_duration_us": {
            "blip2": 0,
            "blip2_vision": 100 * n_vis * scale,
            "blip2_llm": 300 * n_llm * scale,
        },
        "nv_inference_compute_input_duration_us": {"blip2": 0, "blip2_vision": 10 * n_vis, "blip2_llm": 10 * n_llm},
        "nv_inference_compute_infer_duration_us": {"blip2": 0, "blip2_vision": 200 * n_vis, "blip2_llm": 400 * n_llm},
        "nv_inference_compute_output_duration_us": {"blip2": 0, "blip2_vision": 5 * n_vis, "blip2_llm": 5 * n_llm},
    }


def _custom(
    tokens: float, steps: float, step_seqs: float, ttft_us: float, first: float, hits: float, misses: float
) -> dict:
    return {
        "blip2_generated_tokens_total": {"blip2_llm": tokens},
        "blip2_engine_steps_total": {"blip2_llm": steps},
        "blip2_engine_step_sequences_total": {"blip2_llm": step_seqs},
        "blip2_time_to_first_token_us_total": {"blip2_llm": ttft_us},
        "blip2_first_tokens_total": {"blip2_llm": first},
        "blip2_requests_cancelled_total": {"blip2_llm": 0},
        "blip2_active_sequences": {"blip2_llm": 3},
        "blip2_embedding_cache_hits_total": {"blip2_vision": hits},
        "blip2_embedding_cache_misses_total": {"blip2_vision": misses},
        "blip2_embedding_cache_entries": {"blip2_vision": misses},
    }


def synthetic_run(with_metrics: bool = True) -> dict:
    # Window 0: 4 users, [T0+10, T0+20): 20 requests -> 2 infer/s; window 1: 8 users, [T0+30, T0+40): 40 requests.
    samples = []
    for i in range(20):
        samples.append([T0 + 10 + i * 0.5, float(i + 1) * 10, 1, "grpc" if i % 2 else "POST", "caption", 12])
    for i in range(40):
        samples.append([T0 + 30 + i * 0.25, float(i + 1) * 20, 1, "grpc" if i % 2 else "POST", "vqa", 12])
    samples.append([T0 + 35.1, 5000.0, 0, "grpc", "vqa", 0])  # one failure in window 1
    samples.append([T0 + 5, 1.0, 1, "grpc", "caption", 1])  # warmup: outside every window
    samples.append([T0 + 25, 1.0, 1, "grpc", "caption", 1])  # between windows
    snap = (
        (lambda t, c: {"t": t, "samples": _metrics(c, gpu=0.5)})
        if with_metrics
        else (lambda t, c: {"t": t, "error": "URLError: refused"})
    )
    windows = [
        {
            "index": 0, "users": 4, "users_running": 4, "start": T0 + 10, "end": T0 + 20,
            "metrics_start": snap(T0 + 10, _counters(0, 0, 0, 0, 0, 1) | _custom(0, 0, 0, 0, 0, 0, 0)),
            "metrics_end": snap(T0 + 20, _counters(20, 20, 10, 20, 20, 1) | _custom(160, 40, 120, 20_000, 20, 5, 15)),
        },
        {
            "index": 1, "users": 8, "users_running": 8, "start": T0 + 30, "end": T0 + 40,
            "metrics_start": snap(T0 + 30, _counters(30, 30, 15, 30, 30, 1)),
            "metrics_end": snap(T0 + 40, _counters(71, 71, 25, 71, 50, 1)),
        },
    ]  # fmt: skip
    return {
        "format": "blip2-loadtest-run/1",
        # blip2_postprocess is configured but absent from the metrics, as on a server without that stage.
        "config": {"model": "blip2", "stage_models": ["blip2_vision", "blip2_postprocess", "blip2_llm"]},
        "started_at": T0,
        "windows": windows,
        "sample_columns": ["t_end", "latency_ms", "ok", "request_type", "name", "response_length"],
        "samples": samples,
        "errors": {"grpc vqa: boom": 1},
    }


def test_build_report_client_figures() -> None:
    result = report.build_report(synthetic_run())
    first, second = result["steps"]
    assert (first["step"], first["concurrency"], first["start_s"], first["duration_s"]) == (0, 4, 10.0, 10.0)
    assert first["request_count"] == 20 and first["failure_count"] == 0
    assert first["throughput_infer_per_sec"] == pytest.approx(2.0)
    assert first["p50_latency_ms"] == 100.0
    assert first["p90_latency_ms"] == 180.0
    assert first["p99_latency_ms"] == 200.0
    assert second["request_count"] == 41 and second["failure_count"] == 1
    assert second["throughput_infer_per_sec"] == pytest.approx(4.0)  # failures do not count
    assert second["max_latency_ms"] == 800.0  # the failed request's 5000 ms is not a latency
    assert second["failure_rate"] == pytest.approx(1 / 41)


def test_build_report_server_figures() -> None:
    result = report.build_report(synthetic_run())
    first, second = result["steps"]
    assert first["blip2_vision_avg_batch_size"] == pytest.approx(2.0)  # 20 inferences / 10 executions
    assert first["blip2_llm_avg_batch_size"] == pytest.approx(1.0)
    assert second["blip2_vision_avg_batch_size"] == pytest.approx(41 / 10)
    assert second["blip2_llm_avg_batch_size"] == pytest.approx(41 / 20)
    assert first["blip2_vision_server_queue_us"] == pytest.approx(100)
    assert first["blip2_llm_server_compute_infer_us"] == pytest.approx(400)
    assert first["blip2_vision_throughput_infer_per_sec"] == pytest.approx(2.0)
    # Top-level queue/compute are summed over the stage models, like perf_analyzer does for an ensemble.
    assert first["server_queue_us"] == pytest.approx(400)
    assert first["server_compute_infer_us"] == pytest.approx(600)
    assert first["server_compute_input_us"] == pytest.approx(20)
    assert first["server_request_us"] == pytest.approx(900)
    assert first["server_failure_count"] == 0
    assert first["gpu_utilization"] == 0.5
    assert result["models"] == ["blip2", "blip2_vision", "blip2_llm"]


def test_build_report_engine_and_cache_figures() -> None:
    first, second = report.build_report(synthetic_run())["steps"]
    assert first["blip2_llm_engine_avg_batch_size"] == pytest.approx(3.0)  # 120 sequences over 40 steps
    assert first["blip2_llm_output_token_throughput_per_sec"] == pytest.approx(16.0)
    assert first["output_token_throughput_per_sec"] == pytest.approx(16.0)
    assert first["blip2_llm_avg_output_tokens"] == pytest.approx(8.0)
    assert first["blip2_llm_time_to_first_token_ms"] == pytest.approx(1.0)
    assert first["server_time_to_first_token_ms"] == pytest.approx(1.0)
    assert first["blip2_llm_active_sequences"] == 3
    assert first["blip2_vision_cache_hit_rate"] == pytest.approx(0.25)
    assert "blip2_vision_engine_avg_batch_size" not in first  # only models exporting a family get its columns
    assert "blip2_llm_cache_hit_rate" not in first
    assert "blip2_llm_engine_avg_batch_size" not in second  # window 1's scrapes carry no engine metrics


def test_build_report_without_metrics_leaves_server_columns_empty() -> None:
    result = report.build_report(synthetic_run(with_metrics=False))
    step = result["steps"][0]
    assert step["throughput_infer_per_sec"] == pytest.approx(2.0)
    assert step["server_queue_us"] is None
    assert step["blip2_vision_avg_batch_size"] is None
    assert result["metrics_scrape_errors"]


def test_by_request_rows_split_protocol_and_task() -> None:
    rows = report.build_report(synthetic_run())["by_request"]
    keys = {(r["step"], r["request_type"], r["name"]) for r in rows}
    assert keys == {(0, "POST", "caption"), (0, "grpc", "caption"), (1, "POST", "vqa"), (1, "grpc", "vqa")}
    grpc_vqa = next(r for r in rows if r["step"] == 1 and r["request_type"] == "grpc")
    assert grpc_vqa["request_count"] == 21 and grpc_vqa["failure_count"] == 1


def test_summary_peak_saturation_and_slo() -> None:
    def row(concurrency: int, throughput: float, p95: float) -> dict:
        return {"concurrency": concurrency, "throughput_infer_per_sec": throughput, "p95_latency_ms": p95,
                "request_count": 100, "failure_count": 0}  # fmt: skip

    rows = [row(4, 10.0, 400.0), row(8, 19.0, 900.0), row(12, 20.0, 1500.0)]
    summary = report.summarize(rows, slo_ms=1000.0, slo_percentile=95)
    assert summary["max_throughput_infer_per_sec"] == 20.0
    assert summary["max_throughput_concurrency"] == 12
    assert summary["saturation_concurrency"] == 8
    assert summary["slo"]["concurrency"] == 8
    assert summary["slo"]["throughput_infer_per_sec"] == 19.0
    assert report.summarize(rows, slo_ms=100.0, slo_percentile=95)["slo"]["concurrency"] is None


def test_rejects_other_files() -> None:
    with pytest.raises(ValueError):
        report.build_report({"format": "something-else"})


def assert_png_non_trivial(path: Path) -> None:
    from PIL import Image

    assert path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 400 and image.height >= 300
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is None or len(colours) > 10  # a chart, not a blank canvas


def test_write_report_files(tmp_path: Path) -> None:
    run_path = tmp_path / "run.json"
    run_path.write_text(json.dumps(synthetic_run()))
    result = report.generate(run_path, tmp_path / "out", slo_ms=500)
    out = tmp_path / "out"
    with (out / "capacity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for column in ("concurrency", "throughput_infer_per_sec", "p50_latency_ms", "p90_latency_ms", "p95_latency_ms",
                   "p99_latency_ms", "server_queue_us", "server_compute_infer_us", "blip2_vision_avg_batch_size",
                   "blip2_llm_avg_batch_size", "failure_count"):  # fmt: skip
        assert column in rows[0], column
    assert float(rows[0]["blip2_vision_avg_batch_size"]) == pytest.approx(2.0)
    data = json.loads((out / "capacity.json").read_text())
    assert data["format"] == report.REPORT_FORMAT
    assert [s["concurrency"] for s in data["steps"]] == [4, 8]
    assert data["summary"]["slo"]["latency_ms"] == 500
    assert result["steps"][1]["failure_count"] == 1
    assert (out / "capacity_by_request.csv").stat().st_size > 0
    for name in ("latency_vs_throughput.png", "batch_size_vs_load.png", "server_time_vs_load.png"):
        assert_png_non_trivial(out / name)


def test_gzipped_run_file(tmp_path: Path) -> None:
    import gzip

    run_path = tmp_path / "run.json.gz"
    with gzip.open(run_path, "wt") as f:
        json.dump(synthetic_run(), f)
    assert report.generate(run_path, tmp_path)["steps"][0]["request_count"] == 20


def test_report_cli_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_path = tmp_path / "run.json"
    run_path.write_text(json.dumps(synthetic_run()))
    assert report.main([str(run_path), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "blip2_vision" in printed and "max_throughput_infer_per_sec" in printed
    assert (tmp_path / "cli" / "capacity.csv").exists()
