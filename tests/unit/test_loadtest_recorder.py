from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest import prom, report  # noqa: E402
from loadtest.recorder import RunRecorder  # noqa: E402
from loadtest.shapes import fixed_plan, phase_at, step_plan  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTriton:
    """Counters that grow with the clock: 2 requests/s, executed in pairs."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.scrapes = 0

    def __call__(self, url: str) -> list[prom.Sample]:
        self.scrapes += 1
        n = (self.clock.now - 1000.0) * 2
        out = []
        for model in ("blip2", "blip2_vision", "blip2_llm"):
            labels = {"model": model, "version": "1"}
            out += [
                prom.Sample("nv_inference_request_success", labels, n),
                prom.Sample("nv_inference_count", labels, n),
                prom.Sample("nv_inference_exec_count", labels, n if model == "blip2" else n / 2),
                prom.Sample("nv_inference_queue_duration_us", labels, 50.0 * n),
            ]
        return out


def drive(recorder: RunRecorder, clock: FakeClock, stages: list, until: float) -> None:
    """Mimics Locust's 1 s shape ticks, with one completed request every 0.5 s."""
    t = 0.0
    while t <= until:
        clock.now = 1000.0 + t
        recorder.advance(phase_at(stages, t), users_now=stages[0].users)
        if t < until:
            for half in (0.25, 0.75):
                recorder.add("grpc", "caption", 100.0, 10, None, t_end=1000.0 + t + half)
        t += 1.0


def test_step_windows_open_after_warmup_and_close_at_step_end() -> None:
    clock = FakeClock()
    triton = FakeTriton(clock)
    recorder = RunRecorder("http://metrics", scraper=triton, clock=clock)
    stages = step_plan(step_users=2, step_duration=10, max_steps=2, warmup=3)
    recorder.reset({"model": "blip2", "stage_models": ["blip2_vision", "blip2_llm"]})
    drive(recorder, clock, stages, until=20)
    data = recorder.to_json()
    assert [(w["index"], w["users"], w["start"], w["end"]) for w in data["windows"]] == [
        (0, 2, 1003.0, 1010.0),
        (1, 4, 1013.0, 1020.0),
    ]
    assert triton.scrapes == 4
    result = report.build_report(data)
    step = result["steps"][0]
    assert step["request_count"] == 14
    assert step["throughput_infer_per_sec"] == 2.0
    assert step["blip2_vision_avg_batch_size"] == 2.0
    assert step["blip2_llm_server_queue_us"] == 50.0


def test_fixed_windows_share_the_boundary_scrape() -> None:
    clock = FakeClock()
    triton = FakeTriton(clock)
    recorder = RunRecorder("http://metrics", scraper=triton, clock=clock)
    stages = fixed_plan(users=4, duration=12, interval=4, warmup=2)
    recorder.reset({})
    drive(recorder, clock, stages, until=12)
    windows = recorder.to_json()["windows"]
    assert [(w["start"], w["end"]) for w in windows] == [(1002.0, 1006.0), (1006.0, 1010.0), (1010.0, 1012.0)]
    assert windows[0]["metrics_end"] is windows[1]["metrics_start"]
    assert triton.scrapes == 4


def test_scrape_failure_is_recorded_not_raised() -> None:
    def broken(url: str) -> list[prom.Sample]:
        raise OSError("connection refused")

    clock = FakeClock()
    recorder = RunRecorder("http://metrics", scraper=broken, clock=clock)
    stages = step_plan(step_users=1, step_duration=4, max_steps=1, warmup=1)
    drive(recorder, clock, stages, until=4)
    window = recorder.to_json()["windows"][0]
    assert "connection refused" in window["metrics_start"]["error"]
    assert report.build_report(recorder.to_json())["steps"][0]["server_queue_us"] is None


def test_no_metrics_url_still_records_windows() -> None:
    clock = FakeClock()
    recorder = RunRecorder(None, clock=clock)
    drive(recorder, clock, step_plan(step_users=1, step_duration=4, max_steps=1, warmup=1), until=4)
    assert len(recorder.to_json()["windows"]) == 1


def test_interrupted_run_keeps_partial_window() -> None:
    clock = FakeClock()
    recorder = RunRecorder(None, clock=clock)
    stages = step_plan(step_users=1, step_duration=10, max_steps=2, warmup=1)
    drive(recorder, clock, stages, until=5)
    assert recorder.to_json()["windows"] == []  # still open
    clock.now = 1005.5
    recorder.close()
    (window,) = recorder.to_json()["windows"]
    assert (window["start"], window["end"]) == (1001.0, 1005.5)


def test_failures_drain_merge_and_dump(tmp_path: Path) -> None:
    worker = RunRecorder(None)
    worker.add("POST", "vqa", 12.0, 0, RuntimeError("HTTP 500"), t_end=5.0)
    worker.add("POST", "vqa", 10.0, 20, None, t_end=4.0)
    master = RunRecorder(None)
    master.reset({"model": "blip2"})
    master.merge(json.loads(json.dumps(worker.drain())))  # payloads travel as JSON-ish msgpack
    assert worker.samples == [] and not worker.errors
    path = master.dump(tmp_path / "sub" / "run.json")
    data = json.loads(path.read_text())
    assert data["format"] == "blip2-loadtest-run/1"
    assert [row[0] for row in data["samples"]] == [4.0, 5.0]  # time-ordered for the report's bisection
    assert data["samples"][1][2] == 0
    assert data["errors"] == {"POST vqa: HTTP 500": 1}
