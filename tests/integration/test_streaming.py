"""Token streaming and in-flight batching through a real tritonserver."""

from __future__ import annotations

import queue
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
from images import PROMPTS
from triton_helpers import Clients, build_inputs, start_server


def stream(server, image: bytes, prompt: str | None, model: str = "blip2_stream", cancel_after: int | None = None,
           **controls) -> list[str]:
    return stream_pieces(server, image, prompt, model=model, cancel_after=cancel_after, **controls)


def stream_pieces(server, image: bytes, prompt: str | None, *, model: str = "blip2_stream",
                  cancel_after: int | None = None, on_piece=None, **controls) -> list[str]:
    """Pieces of one streamed request, in order (stops early and cancels after `cancel_after` pieces)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(
        model, build_inputs(grpcclient, image, prompt, **controls), enable_empty_final_response=True
    )
    pieces: list[str] = []
    try:
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                raise error
            response = result.get_response()
            text = result.as_numpy("text_output")
            if text is not None:
                pieces.append(text[0, 0].decode("utf-8"))
                if on_piece is not None:
                    on_piece()
            if response.parameters["triton_final_response"].bool_param:
                return pieces
            if cancel_after is not None and len(pieces) >= cancel_after:
                return pieces
    finally:
        client.stop_stream(cancel_requests=cancel_after is not None)
        client.close()


def metric(server, name: str, model: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    match = re.search(rf'^{name}\{{[^}}]*model="{model}"[^}}]*\}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not exported"
    return float(match.group(1))


@pytest.mark.parametrize("model", ["blip2", "blip2_t5"])
def test_streamed_pieces_concatenate_to_the_reference(triton_server, sample_images, reference, t5_reference, model):
    ref = reference if model == "blip2" else t5_reference
    clients = Clients("grpc", triton_server)
    for name in ("rgb_jpeg", "palette_gif", "wide_png"):
        for prompt in PROMPTS:
            data = sample_images[name]
            pieces = stream(triton_server, data, prompt, model=f"{model}_stream", max_tokens=24)
            whole = clients.infer(data, prompt, model=model, max_tokens=24)
            assert "".join(pieces) == whole == ref(data, prompt, 24)
            if model == "blip2":
                assert len(pieces) > 1, "a decoder-only model should stream several pieces"
    clients.close()


def _long_case(sample_images, hf_reference) -> tuple[bytes, int]:
    # The image whose greedy caption runs longest before EOS, so "long" really means many decoding steps.
    def tokens(data: bytes) -> int:
        return len(hf_reference.processor.tokenizer(hf_reference(data, None, 256)).input_ids)

    data = max(sample_images.values(), key=tokens)
    assert tokens(data) > 150
    return data, 256


def test_short_request_overtakes_a_running_long_one(triton_server, sample_images, hf_reference) -> None:
    long_image, long_tokens = _long_case(sample_images, hf_reference)
    clients = Clients("grpc", triton_server)
    finished: list[str] = []
    started = threading.Event()

    def run_long() -> str:
        pieces = stream_pieces(triton_server, long_image, None, on_piece=started.set, max_tokens=long_tokens)
        finished.append("long")
        return "".join(pieces)

    with ThreadPoolExecutor(max_workers=1) as pool:
        long = pool.submit(run_long)
        assert started.wait(60)  # the long request is decoding when the short one arrives
        short = clients.infer(sample_images["bmp"], None, max_tokens=2)
        finished.append("short")
        assert long.result() == hf_reference(long_image, None, long_tokens)
    assert short == hf_reference(sample_images["bmp"], None, 2)
    # Under static batching the short request would wait for the running batch to finish first.
    assert finished == ["short", "long"]
    clients.close()


def test_inflight_mixed_load_matches_reference(triton_server, sample_images, reference) -> None:
    clients = Clients("http", triton_server)
    names = sorted(sample_images)
    cases = [(sample_images[n], PROMPTS[i % 2], 4 if i % 2 else 48) for i, n in enumerate(names * 2)]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        got = list(pool.map(lambda c: clients.infer(c[0], c[1], max_tokens=c[2]), cases))
    assert got == [reference(*c) for c in cases]
    clients.close()


def test_cancelled_stream_frees_its_sequence(triton_server, sample_images, hf_reference, reference) -> None:
    long_image, _ = _long_case(sample_images, hf_reference)
    before = metric(triton_server, "blip2_requests_cancelled_total", "blip2_llm")
    pieces = stream(triton_server, long_image, None, cancel_after=2, max_tokens=256)
    assert len(pieces) == 2
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if metric(triton_server, "blip2_requests_cancelled_total", "blip2_llm") > before:
            break
        time.sleep(0.2)
    assert metric(triton_server, "blip2_requests_cancelled_total", "blip2_llm") == before + 1
    assert metric(triton_server, "blip2_active_sequences", "blip2_llm") == 0
    assert metric(triton_server, "blip2_kv_cache_bytes", "blip2_llm") == 0
    # The freed capacity serves the next request normally.
    clients = Clients("grpc", triton_server)
    assert clients.infer(sample_images["bmp"], None, max_tokens=5) == reference(sample_images["bmp"], None, 5)
    clients.close()


def test_engine_metrics_count_tokens(triton_server, sample_images) -> None:
    tokens = metric(triton_server, "blip2_generated_tokens_total", "blip2_llm")
    steps = metric(triton_server, "blip2_engine_steps_total", "blip2_llm")
    first = metric(triton_server, "blip2_first_tokens_total", "blip2_llm")
    Clients("grpc", triton_server).infer(sample_images["tiff"], None, max_tokens=6)
    assert metric(triton_server, "blip2_first_tokens_total", "blip2_llm") == first + 1
    assert metric(triton_server, "blip2_engine_steps_total", "blip2_llm") > steps
    assert 1 <= metric(triton_server, "blip2_generated_tokens_total", "blip2_llm") - tokens <= 6
    assert metric(triton_server, "blip2_engine_admitted_total", "blip2_llm") >= first + 1
    assert metric(triton_server, "blip2_waiting_sequences", "blip2_llm") == 0


def test_static_scheduler_serves_the_same_text(tiny_model_dir, server_log_dir, sample_images, reference) -> None:
    server = start_server(server_log_dir, "static", model_id=str(tiny_model_dir), env={"BLIP2_SCHEDULER": "static"})
    try:
        clients = Clients("grpc", server)
        cases = [(sample_images[n], p, 10) for n in sorted(sample_images)[:4] for p in PROMPTS]
        with ThreadPoolExecutor(max_workers=8) as pool:
            got = list(pool.map(lambda c: clients.infer(*c[:2], max_tokens=c[2]), cases))
        assert got == [reference(*c) for c in cases]
        assert "".join(stream(server, *cases[0][:2], max_tokens=10)) == got[0]
        clients.close()
        assert "scheduler=static" in server.log_path.read_text()
    finally:
        server.stop()




def test_client_library_streams_through_the_server(triton_server, sample_images, reference) -> None:
    from blip2_client import Blip2Client

    data = sample_images["rgba_png"]
    with Blip2Client(triton_server.grpc_url, protocol="grpc", timeout_s=60) as client:
        pieces = list(client.stream(data, "Question: what color is the car? Answer:", max_tokens=20))
    assert len(pieces) > 1
    assert "".join(pieces) == reference(data, "Question: what color is the car? Answer:", 20)


def test_stream_reports_bad_input_with_its_message(triton_server, sample_images) -> None:
    with pytest.raises(Exception) as e:
        stream(triton_server, b"not an image", None, max_tokens=5)
    # gRPC stream errors carry a message but no status code (Triton's stream protocol).
    assert str(e.value) == "image: bytes are not a supported image file"
    with pytest.raises(Exception) as e:
        stream(triton_server, sample_images["bmp"], None, max_tokens=0)
    assert "max_tokens: expected 1..256, got 0" in str(e.value)
    # Rejected inside the engine (prompt length is known after tokenizing): the error reaches the stream's poll.
    with pytest.raises(Exception) as e:
        stream(triton_server, sample_images["bmp"], "many words " * 300, max_tokens=5)
    assert "text_input: expected at most 256 tokens" in str(e.value)


def test_the_last_streamed_response_carries_the_count_and_reason(triton_server, sample_images) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("blip2_stream", build_inputs(grpcclient, sample_images["bmp"], None, max_tokens=6),
                              enable_empty_final_response=True)
    try:
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert int(result.as_numpy("num_output_tokens")[0, 0]) == 6
    assert result.as_numpy("finish_reason")[0, 0] == b"length"


def test_latency_histograms_are_exported(triton_server, sample_images) -> None:
    Clients("grpc", triton_server).infer(sample_images["bmp"], None, max_tokens=3)
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    for name in ("blip2_time_to_first_token_seconds", "blip2_request_duration_seconds"):
        lines = [line for line in text.splitlines() if line.startswith(name) and 'model="blip2_llm"' in line]
        assert any(line.startswith(f"{name}_bucket") for line in lines), name
        infinite = [float(line.rsplit(" ", 1)[1]) for line in lines if 'le="+Inf"' in line]
        assert infinite and infinite[0] >= 1, name
        assert any(line.startswith(f"{name}_count") for line in lines)
        assert any(line.startswith(f"{name}_sum") for line in lines)


def test_log_lines_about_a_request_carry_its_id(triton_server, sample_images, hf_reference) -> None:
    # The stream front end passes the client's id on: the LLM stage's line about the cancellation names it.
    long_image, _ = _long_case(sample_images, hf_reference)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("blip2_stream", build_inputs(grpcclient, long_image, None, max_tokens=256),
                              request_id="trace-me-7", enable_empty_final_response=True)
    try:
        results.get(timeout=120)  # generating
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    deadline = time.monotonic() + 20
    while "request trace-me-7: request cancelled after" not in triton_server.log_path.read_text():
        assert time.monotonic() < deadline, "no log line names the cancelled request"
        time.sleep(0.2)
