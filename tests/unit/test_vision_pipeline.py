"""The served vision stage in-process: the decoder pool and compute thread give what the stage gives, per-request
errors, and a slow image never holds up the others."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np
import pytest

from blip2_triton.errors import InvalidRequestError
from blip2_triton.options import ServerOptions
from blip2_triton.requests import ImageRequest
from blip2_triton.vision import VisionStage
from blip2_triton.vision.pipeline import DecodeQueue, VisionPipeline, _Decode


@pytest.fixture(scope="module")
def stage(tiny_model_dir: Path) -> VisionStage:
    return VisionStage(ServerOptions(model_id=str(tiny_model_dir), embedding_cache_bytes=0))


class Results:
    def __init__(self) -> None:
        self.done: dict[str, list] = {}
        self.events: dict[str, threading.Event] = {}

    def on_done(self, name: str):
        self.events[name] = threading.Event()

        def done(rows: list) -> None:
            self.done[name] = rows
            self.events[name].set()

        return done

    def wait(self, name: str, timeout_s: float = 60) -> list:
        assert self.events[name].wait(timeout_s), f"{name} was never answered"
        return self.done[name]


def test_pipeline_results_equal_the_stage_and_errors_stay_in_their_request(stage, sample_images) -> None:
    names = sorted(sample_images)
    expected = stage.run([ImageRequest(sample_images[n]) for n in names])
    pipeline = VisionPipeline(stage, decode_threads=2, max_batch=4)
    results = Results()
    try:
        pipeline.submit([ImageRequest(sample_images[n]) for n in names], results.on_done("all"))
        pipeline.submit([ImageRequest(sample_images[names[0]]), ImageRequest(b"not an image")],
                        results.on_done("bad"))
        # Base64 text and a data URL are the same image as its bytes.
        encoded = base64.b64encode(sample_images[names[1]])
        pipeline.submit([ImageRequest(encoded), ImageRequest(b"data:image/png;base64," + encoded)],
                        results.on_done("text"))
        got = results.wait("all")
        bad = results.wait("bad")
        text = results.wait("text")
    finally:
        pipeline.stop()
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert isinstance(bad[1], InvalidRequestError) and isinstance(bad[0], np.ndarray)
    for row in text:
        np.testing.assert_allclose(row, expected[1], rtol=1e-5, atol=1e-5)


def test_a_slow_image_does_not_hold_up_the_requests_behind_it(stage, sample_images, monkeypatch) -> None:
    slow_bytes = sample_images["webp"]
    release, slow_started = threading.Event(), threading.Event()
    real = stage.prepare

    def prepare(request: ImageRequest):
        if request.data == slow_bytes:
            slow_started.set()
            assert release.wait(60)
        return real(request)

    monkeypatch.setattr(stage, "prepare", prepare)
    pipeline = VisionPipeline(stage, decode_threads=2, max_batch=16)
    results = Results()
    try:
        pipeline.submit([ImageRequest(slow_bytes)], results.on_done("slow"))
        assert slow_started.wait(30)
        others = [n for n in sorted(sample_images) if sample_images[n] != slow_bytes][:4]
        for name in others:
            pipeline.submit([ImageRequest(sample_images[name])], results.on_done(name))
        for name in others:
            assert isinstance(results.wait(name)[0], np.ndarray)
        assert not results.events["slow"].is_set(), "the slow image was still decoding"
        release.set()
        assert isinstance(results.wait("slow")[0], np.ndarray)
    finally:
        release.set()
        pipeline.stop()


def test_identical_images_in_flight_are_decoded_once(tiny_model_dir, sample_images, monkeypatch) -> None:
    stage = VisionStage(ServerOptions(model_id=str(tiny_model_dir)))
    calls: list[bytes] = []
    gate = threading.Event()
    real = stage.prepare

    def prepare(request: ImageRequest):
        calls.append(request.data)
        assert gate.wait(30)
        return real(request)

    monkeypatch.setattr(stage, "prepare", prepare)
    pipeline = VisionPipeline(stage, decode_threads=2)
    results = Results()
    try:
        data = sample_images["rgb_jpeg"]
        pipeline.submit([ImageRequest(data)], results.on_done("a"))
        pipeline.submit([ImageRequest(data), ImageRequest(data)], results.on_done("b"))
        gate.set()
        first, second = results.wait("a"), results.wait("b")
    finally:
        gate.set()
        pipeline.stop()
    assert calls == [data]
    assert np.array_equal(first[0], second[0]) and np.array_equal(second[0], second[1])
    assert stage.cache.stats().hits == 2


def _task(pixels: int) -> _Decode:
    return _Decode(key=object(), request=ImageRequest(b"x"), pixels=pixels)


def test_decode_queue_takes_the_smallest_image_that_fits_the_budget() -> None:
    q = DecodeQueue(budget_pixels=100, aging_s=60)
    big, small, medium = _task(90), _task(5), _task(40)
    for t in (big, small, medium):
        q.put(t)
    assert q.get() is small
    assert q.get() is medium
    # 45 in flight: the 90-pixel image does not fit until they finish.
    q.put(tiny := _task(1))
    assert q.get() is tiny
    for t in (small, medium, tiny):
        q.done(t)
    assert q.get() is big


def test_decode_queue_serves_a_long_waiting_image_first() -> None:
    q = DecodeQueue(budget_pixels=100, aging_s=0.0)
    old, young = _task(80), _task(1)
    q.put(old)
    q.put(young)
    assert q.get() is old


def test_an_image_larger_than_the_budget_runs_alone() -> None:
    q = DecodeQueue(budget_pixels=10, aging_s=60)
    huge = _task(50)
    q.put(huge)
    assert q.get() is huge
    q.close()
    assert q.get() is None


def test_a_request_over_its_pixel_budget_fails_whole_before_decoding(tiny_model_dir, monkeypatch) -> None:
    from PIL import Image

    def png(width: int, height: int) -> bytes:
        buffer = __import__("io").BytesIO()
        Image.new("1", (width, height)).save(buffer, "PNG")
        return buffer.getvalue()

    stage = VisionStage(ServerOptions(model_id=str(tiny_model_dir), max_request_pixels=1_000_000))
    decoded: list[bytes] = []
    real = stage.prepare
    monkeypatch.setattr(stage, "prepare", lambda request: (decoded.append(request.data), real(request))[1])
    pipeline = VisionPipeline(stage, decode_threads=1)
    results = Results()
    try:
        pipeline.submit([ImageRequest(png(800, 800)), ImageRequest(png(800, 800))], results.on_done("big"))
        pipeline.submit([ImageRequest(png(800, 800))], results.on_done("ok"))
        big, ok = results.wait("big"), results.wait("ok")
    finally:
        pipeline.stop()
    assert all(isinstance(row, InvalidRequestError) for row in big)
    assert "expected at most 1000000 pixels in one request, got 1280000" in str(big[0])
    assert isinstance(ok[0], np.ndarray) and len(decoded) == 1
