"""How the throughput benchmark turns request timings into figures: the closed loop's steady window and the
open loop's fixed arrival rate. The benchmark script is not a package; it is imported from bench/ by name."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="module")
def bench(import_bench):
    return import_bench("bench_throughput")


def _requests(bench, tokens: list[int]):
    return [bench.Request(b"", f"i{k}", None, t) for k, t in enumerate(tokens)]


def test_window_opens_when_every_client_was_answered_and_closes_when_the_first_runs_dry(bench) -> None:
    S = bench.Span
    spans = [
        S(0, 0, 0.0, 1.0), S(2, 0, 1.0, 2.0), S(4, 0, 2.0, 3.0),  # client 0 runs dry at 3.0
        S(1, 1, 0.0, 1.5), S(3, 1, 1.5, 3.5), S(5, 1, 3.5, 5.0),
    ]
    assert bench.steady_window(spans, 2) == (1.5, 3.0)
    # A client that never got an answer, one client only, or no overlap: no steady state to speak of.
    assert bench.steady_window(spans[:3], 2) is None
    assert bench.steady_window(spans, 1) is None
    assert bench.steady_window([S(0, 0, 0.0, 1.0), S(1, 1, 0.0, 2.0)], 2) is None


def test_point_uses_the_steady_window_and_splits_latency_by_length(bench) -> None:
    S = bench.Span
    # Two clients, alternating 4- and 48-token requests; the first answers come as one burst at t=10.
    spans = [S(0, 0, 0.0, 10.0), S(1, 1, 0.0, 10.0)]
    t = {0: 10.0, 1: 10.0}
    for i in range(2, 22):
        client = i % 2
        length = 1.0 if i % 4 < 2 else 3.0
        spans.append(S(i, client, t[client], t[client] + length))
        t[client] += length
    reqs = _requests(bench, [4 if i % 4 < 2 else 48 for i in range(22)])
    lat = [s.end - s.start for s in spans]
    point = bench.make_point("d_inflight", "vqa_mixed", 2, reqs, lat, 30.0, spans)
    t0, t1 = bench.steady_window(spans, 2)
    assert point.steady and (t0, t1) == (10.0, 30.0)
    # Every request after the burst lies wholly inside the window: 20 in 20 s.
    assert point.rps == pytest.approx(1.0)
    assert point.rps_run == pytest.approx(22 / 30.0)
    # The 10 s burst answers were sent before the window opened, so no latency above 3 s is counted.
    assert point.p99_ms <= 3000.0 and point.measured == 20
    assert point.by_tokens["4"] == {"n": 10, "p50_ms": 1000, "p99_ms": 1000}
    assert point.by_tokens["48"] == {"n": 10, "p50_ms": 3000, "p99_ms": 3000}


def test_lockstep_clients_are_counted_at_their_true_rate(bench) -> None:
    # Static batching answers a whole cohort at nearly one instant: 8 clients, 1 s rounds, 6 rounds, answers
    # 1 ms apart. The window runs from the last answer of round 1 to the first of round 6, so counting whole
    # answers inside it would give 4 rounds and one answer in 5 s (6.6 req/s).
    S = bench.Span
    spans = [S(r * 8 + k, k, r + 0.001 * k, r + 1 + 0.001 * k) for r in range(6) for k in range(8)]
    reqs = _requests(bench, [20] * len(spans))
    point = bench.make_point("c_static", "captions", 8, reqs, [1.0] * len(spans), 6.0, spans)
    assert point.steady
    assert point.rps == pytest.approx(8.0, rel=0.01) and point.tokens_per_s == pytest.approx(160.0, rel=0.01)


def test_long_requests_straddling_the_window_end_are_not_dropped(bench) -> None:
    # Client 0 sends 1 s requests until 20 s; client 1 sends 5 s requests and a last one of 7 s (15..22 s).
    # The window is 5..20 s. Latency samples are chosen by send time, so the long request still running at
    # the window's end counts; choosing requests answered inside the window would drop it.
    S = bench.Span
    spans = [S(k, 0, float(k), float(k + 1)) for k in range(20)]
    spans += [S(100, 1, 0.0, 5.0), S(101, 1, 5.0, 10.0), S(102, 1, 10.0, 15.0), S(103, 1, 15.0, 22.0)]
    reqs = _requests(bench, [4] * 100 + [48] * 4)
    point = bench.make_point("d_inflight", "vqa_mixed", 2, reqs, [s.end - s.start for s in spans], 22.0, spans)
    assert bench.steady_window(spans, 2) == (5.0, 20.0)
    assert point.by_tokens["48"]["n"] == 3 and point.by_tokens["4"]["n"] == 15
    assert point.by_tokens["48"]["p99_ms"] == pytest.approx(7000, abs=50)
    # 15 short requests, 2 long ones and 5/7 of the last long one inside 15 s.
    assert point.rps == pytest.approx((15 + 2 + 5 / 7) / 15)


def test_an_instant_request_inside_the_window_counts_whole(bench) -> None:
    S = bench.Span
    spans = [S(0, 0, 0.0, 1.0), S(1, 1, 0.0, 1.0), S(2, 0, 1.0, 3.0), S(3, 1, 1.0, 3.0), S(4, 0, 3.0, 3.0),
             S(5, 1, 3.0, 5.0), S(6, 0, 3.0, 5.0)]
    reqs = _requests(bench, [4] * 7)
    point = bench.make_point("d_inflight", "captions", 2, reqs, [s.end - s.start for s in spans], 5.0, spans)
    # Window 1..5 s: two requests of 1..3, the instant one at 3 and two of 3..5.
    assert point.rps == pytest.approx(5 / 4)


def test_point_falls_back_to_the_whole_run_without_a_window(bench) -> None:
    reqs = _requests(bench, [20, 20, 20])
    point = bench.make_point("b", "captions", 3, reqs, [1.0, 1.0, 1.0], 2.0)
    assert not point.steady and point.rps == pytest.approx(1.5) and point.measured == 3
    assert point.by_tokens == {}


def test_open_loop_latency_counts_from_the_scheduled_send(bench) -> None:
    # One sender thread and a 20 ms server at 100,000 req/s offered: each request waits for all before it, so
    # latencies must grow through the run and the point must say the server fell behind.
    reqs = _requests(bench, [4, 48] * 10)

    def call(_req) -> str:
        time.sleep(0.02)
        return "x"

    lat, texts, seconds = bench.open_loop(call, reqs, rate_rps=100_000.0, seed=0, max_outstanding=1)
    assert texts == ["x"] * 20 and seconds < 1.0
    # The last send was due at once (offsets of ~10 us) and ran after 19 sleeps of 20 ms and its own.
    assert lat[-1] >= 0.39
    point = bench.make_open_point("d_inflight", "vqa_mixed", 100_000.0, reqs, lat, seconds)
    assert point.saturated and point.measured == 18 and set(point.by_tokens) == {"4", "48"}


def test_open_loop_at_a_rate_the_server_keeps_up_with_is_not_saturated(bench) -> None:
    # 60 requests: one scheduler stall of a loaded CI machine cannot lift a third's mean by 50 ms.
    reqs = _requests(bench, [4] * 60)
    lat, _, seconds = bench.open_loop(lambda _r: "x", reqs, rate_rps=200.0, seed=1)
    point = bench.make_open_point("c_static", "vqa_mixed", 200.0, reqs, lat, seconds)
    assert not point.saturated and point.sent_rps > 0


def test_a_steady_mix_of_short_and_long_answers_is_not_taken_for_a_queue(bench) -> None:
    reqs = _requests(bench, [4, 48] * 30)
    # Stable: 1 s and 7 s answers, with the long ones landing late in the run by chance.
    stable = [(1.0 if r.max_tokens == 4 else 7.0) + (0.3 if k > 40 and r.max_tokens == 48 else 0.0)
              for k, r in enumerate(reqs)]
    assert not bench.latency_grows(reqs, stable)
    # A queue: every answer waits 100 ms longer than the one before, whatever its length.
    queued = [x + 0.1 * k for k, x in enumerate(stable)]
    assert bench.latency_grows(reqs, queued)


def test_open_loop_stops_sending_at_the_first_failure(bench) -> None:
    sent: list[int] = []

    def call(req) -> str:
        sent.append(int(req.image_id[1:]))
        if req.image_id == "i0":
            raise RuntimeError("server down")
        return "x"

    reqs = _requests(bench, [4] * 8)
    started = time.perf_counter()
    # 1 request/s offered: the schedule would take about 7 s; the failure of the first must end it at once.
    with pytest.raises(RuntimeError, match="server down"):
        bench.open_loop(call, reqs, rate_rps=1.0, seed=3)
    assert time.perf_counter() - started < 1.0 and len(sent) < 8


def test_a_report_keeps_each_figure_on_disk_and_records_a_failing_one(bench, tmp_path) -> None:
    import json

    out = tmp_path / "report.json"
    report = bench.Report(out, shapes="tiny")
    report.measure("fine", lambda: {"ms": 1.5})
    assert json.loads(out.read_text()) == {"shapes": "tiny", "fine": {"ms": 1.5}}

    def broken() -> dict:
        raise RuntimeError("capture failed: operation not permitted when stream is capturing")

    report.measure("graphs", broken)
    written = json.loads(out.read_text())
    assert written["fine"] == {"ms": 1.5}
    assert written["graphs"] == {"error": "RuntimeError: capture failed: operation not permitted when stream is "
                                          "capturing"}


def test_a_failing_figure_keeps_what_it_had_written(bench, tmp_path) -> None:
    import json

    out = tmp_path / "report.json"
    report = bench.Report(out)

    def graphs() -> dict:
        report["graphs"] = {"off": {"decode_step_ms": 9.9}}  # written as measured, then the next part fails
        raise MemoryError("CUDA out of memory")

    report.measure("graphs", graphs)
    assert json.loads(out.read_text()) == {"graphs": {"off": {"decode_step_ms": 9.9},
                                                      "error": "MemoryError: CUDA out of memory"}}
    assert not list(tmp_path.glob("*.partial"))
