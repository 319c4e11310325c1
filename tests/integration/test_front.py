"""The front in process, in front of the session's real tritonserver: hostile requests stop at the front (Triton
never sees them), internal models are unreachable, the KServe routes answer as Triton does, and the OpenAI gateway
answers the `openai` SDK with the ensemble's own text."""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from blip2_client import Blip2Client
from triton_helpers import build_inputs, cancelled_requests, front_settings, infer, run_locust
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from blip2_triton.front import Front, FrontSettings
from blip2_triton.front.triton import split_bytes_tensor
from blip2_triton.supervisor import free_port
from blip2_triton.supervisor.processes import SHM_DIR, stub_processes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "what is in the picture?"
VQA = f"Question: {QUESTION} Answer:"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def image_server(sample_images: dict[str, bytes]) -> Iterator[str]:
    image = sample_images["rgb_png_portrait"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            data = image if self.path == "/cat.png" else b"x" * (2 * MIB)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def front(triton_server: Any, tiny_model_dir: Path) -> Iterator[Front]:
    settings = front_settings(triton_server, max_image_bytes=1 * MIB, image_url_hosts=("127.0.0.1",),
                              tokenizers={"blip2": str(tiny_model_dir)})
    with Front(settings) as running:
        yield running


@pytest.fixture(scope="module")
def image(sample_images: dict[str, bytes]) -> bytes:
    return sample_images["rgb_jpeg"]


def data_url(data: bytes, media: str = "image/jpeg") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def chat_messages(url: str, text: str | None = QUESTION) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.insert(0, {"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def direct(triton_server: Any, image: bytes, prompt: str | None, **controls: Any) -> str:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        return infer(client, image, prompt, **controls)
    finally:
        client.close()


def direct_usage(triton_server: Any, image: bytes, prompt: str | None, **controls: Any) -> tuple[int, str]:
    """(num_output_tokens, finish_reason) the `blip2` ensemble reports for a request."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "num_output_tokens", "finish_reason")]
        result = client.infer("blip2", build_inputs(grpcclient, image, prompt, **controls), outputs=outputs)
        return int(result.as_numpy("num_output_tokens").reshape(-1)[0]), \
            result.as_numpy("finish_reason").reshape(-1)[0].decode()
    finally:
        client.close()


def triton_counts(triton_server: Any) -> dict[str, int]:
    """Requests each public model has seen (successes and failures), from Triton's own statistics."""
    client = httpclient.InferenceServerClient(triton_server.http_hostport)
    try:
        counts = {}
        for stats in client.get_inference_statistics()["model_stats"]:
            inference = stats["inference_stats"]
            counts[stats["name"]] = int(inference["success"]["count"]) + int(inference["fail"]["count"])
        return counts
    finally:
        client.close()


def shm_sizes(triton_server: Any) -> dict[str, int]:
    """Size of each stub's shared-memory region: it grows with the tensors sent and never shrinks."""
    stubs = stub_processes(triton_server.process.pid).values()
    return {s.instance: (SHM_DIR / s.shm_region).stat().st_size for s in stubs if s.shm_region}


# -- issue 20: what crashed or bloated Triton stops at the front -------------------------------------------------


def test_deeply_nested_json_is_refused_and_triton_stays_up(front: Front, triton_server: Any, image: bytes) -> None:
    before = triton_counts(triton_server)
    body = b'{"inputs": [' * 100000 + b"]}" * 100000  # made tritonserver 2.51 exit with SIGSEGV
    response = httpx.post(f"{front.http_url}/v2/models/blip2/infer", content=body, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": "front: JSON body: expected nesting at most 32 deep, got 200000"}
    assert response.headers["x-request-id"]
    assert triton_server.is_ready() and triton_counts(triton_server) == before
    assert httpx.get(f"{front.http_url}/v2/health/ready").status_code == 200


def test_oversized_http_body_is_refused_before_triton_sees_it(front: Front, triton_server: Any) -> None:
    counts, shm = triton_counts(triton_server), shm_sizes(triton_server)
    big = b"\xff" * (front.settings.max_request_bytes + 1)  # over the 64 MiB shm region a stub starts with
    inputs = build_inputs(httpclient, big)
    client = httpclient.InferenceServerClient(front.http_url.removeprefix("http://"), network_timeout=60)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("blip2", inputs)
    finally:
        client.close()
    assert info.value.status() == "413" and "over the limit of 67108864 bytes" in info.value.message()
    assert triton_counts(triton_server) == counts
    assert shm_sizes(triton_server) == shm


def test_oversized_grpc_message_is_refused_before_triton_sees_it(front: Front, triton_server: Any) -> None:
    counts, shm = triton_counts(triton_server), shm_sizes(triton_server)
    client = grpcclient.InferenceServerClient(front.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("blip2", build_inputs(grpcclient, b"\xff" * (front.settings.max_request_bytes + 1)))
    finally:
        client.close()
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in info.value.message()
    assert triton_counts(triton_server) == counts
    assert shm_sizes(triton_server) == shm


@pytest.mark.parametrize("model", ["blip2_llm", "blip2_vision", "blip2_t5_llm", "blip2_t5_vision"])
def test_internal_models_are_unreachable(front: Front, triton_server: Any, image: bytes, model: str) -> None:
    counts = triton_counts(triton_server)
    http = httpx.Client(base_url=front.http_url)
    assert http.post(f"/v2/models/{model}/infer", json={"inputs": []}).status_code == 404
    assert http.post(f"/v2/models/{model}/versions/1/infer", json={"inputs": []}).status_code == 404
    assert http.get(f"/v2/models/{model}").json() == {"error": f"front: unknown model '{model}'"}
    assert http.get(f"/v2/models/{model}/config").status_code == 404
    client = grpcclient.InferenceServerClient(front.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, build_inputs(grpcclient, image))
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata(model)
        # (Only this model's: a decoupled model's statistics of an earlier test may land late.)
        assert triton_counts(triton_server)[model] == counts[model]
        # Over a stream each request is judged alone: the internal one is answered with an error, the public
        # one after it still runs.
        results: list[Any] = []
        done = threading.Event()

        def collect(result: Any, error: Any) -> None:
            results.append(error if error is not None else result.as_numpy("text_output"))
            if len(results) == 2:
                done.set()

        client.start_stream(callback=collect)
        client.async_stream_infer(model, build_inputs(grpcclient, image))
        client.async_stream_infer("blip2_stream", build_inputs(grpcclient, image, max_tokens=3))
        assert done.wait(60)
        client.stop_stream()
    finally:
        client.close()
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    assert len(errors) == 1 and f"unknown model '{model}'" in errors[0].message()


def test_public_models_answer_as_triton_does(front: Front, triton_server: Any, image: bytes) -> None:
    expected = direct(triton_server, image, VQA, max_tokens=6)
    with Blip2Client(front.grpc_url, timeout_s=60) as client:
        assert client.generate(image, VQA, max_tokens=6) == expected
        assert "".join(client.stream(image, VQA, max_tokens=6)) == expected
    with Blip2Client(front.http_url, timeout_s=60) as client:
        assert client.generate(image, VQA, max_tokens=6) == expected
        assert client.is_ready()
    # Triton's own invalid-input answer passes through unchanged.
    for url in (front.http_url, triton_server.http_url):
        response = httpx.post(f"{url}/v2/models/blip2_stream/generate_stream", json={"image": "x", "max_tokens": 2})
        assert (response.status_code, response.text) == (400, 'data: {"error":"image: bytes are not a supported '
                                                               'image file"}\n\n')


def test_responses_are_encoded_only_as_the_client_asks(front: Front, image: bytes) -> None:
    host, port = front.http_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                   "data": [base64.b64encode(image).decode()]},
                                  {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [2]}]})
    for accept, encoding in ((None, None), ("gzip", "gzip")):
        # Without an Accept-Encoding, as curl sends it: the front must not let its own HTTP client add one.
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.putrequest("POST", "/v2/models/blip2/infer", skip_accept_encoding=True)
            for name, value in {"content-type": "application/json", "content-length": str(len(body)),
                                **({"accept-encoding": accept} if accept else {})}.items():
                connection.putheader(name, value)
            connection.endheaders(body.encode())
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        assert response.status == 200 and response.getheader("content-encoding") == encoding
        if encoding is None:
            assert json.loads(data)["outputs"][0]["name"] in ("text_output", "finish_reason", "num_output_tokens",
                                                               "num_input_tokens")


def test_request_ids_reach_triton_and_come_back(front: Front, image: bytes) -> None:
    client = httpclient.InferenceServerClient(front.http_url.removeprefix("http://"))
    try:
        result = client.infer("blip2", build_inputs(httpclient, image, max_tokens=2), headers={"x-request-id": "r-1"})
        assert result.get_response()["id"] == "r-1"  # Triton echoes the id the front set in the body
        result = client.infer("blip2", build_inputs(httpclient, image, max_tokens=2), request_id="mine",
                              headers={"x-request-id": "r-2"})
        assert result.get_response()["id"] == "mine"  # the client's own id is kept
    finally:
        client.close()
    client = grpcclient.InferenceServerClient(front.grpc_url)
    try:
        result = client.infer("blip2", build_inputs(grpcclient, image, max_tokens=2), headers={"x-request-id": "g-1"})
        assert result.get_response().id == "g-1"
    finally:
        client.close()
    response = httpx.get(f"{front.http_url}/v2/health/live", headers={"x-request-id": "bad id with spaces"})
    assert response.headers["x-request-id"] != "bad id with spaces" and len(response.headers["x-request-id"]) == 32


def test_access_log_and_metrics(front: Front, image: bytes, caplog: pytest.LogCaptureFixture) -> None:
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused")
    with caplog.at_level(logging.INFO, logger="blip2_triton.front.access"):
        response = client.chat.completions.with_raw_response.create(
            model="blip2", messages=chat_messages(data_url(image)), max_tokens=3, extra_headers={"x-request-id": "m-1"})
        assert response.headers["x-request-id"] == "m-1"
        for _ in client.chat.completions.create(model="blip2", messages=chat_messages(data_url(image)),
                                                max_tokens=3, stream=True):
            pass
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "m-1"]
    assert len(lines) == 1 and lines[0].status == 200 and lines[0].path == "/v1/chat/completions"
    assert lines[0].model == "blip2" and lines[0].bytes_in > len(image)
    text = httpx.get(front.metrics_url).text
    assert 'blip2_front_request_duration_seconds_count{code="200",model="blip2",protocol="http",' \
           'route="/v1/chat/completions"}' in text
    assert 'blip2_front_time_to_first_token_seconds_count{model="blip2"}' in text
    assert 'blip2_front_rejected_requests_total{protocol="http",reason="json_limits"}' in text


def test_readiness_includes_the_supervisors_view(triton_server: Any) -> None:
    stages_healthy = threading.Event()
    stages_healthy.set()
    with Front(front_settings(triton_server, metrics_port=-1), ready=stages_healthy.is_set) as running:
        client = grpcclient.InferenceServerClient(running.grpc_url)
        try:
            assert httpx.get(f"{running.http_url}/v2/health/ready").status_code == 200
            assert client.is_server_ready()
            assert httpx.get(f"{running.http_url}/v2/models/blip2/ready").status_code == 200
            assert client.is_model_ready("blip2")
            stages_healthy.clear()
            assert httpx.get(f"{running.http_url}/v2/health/ready").status_code == 503
            assert not client.is_server_ready()
            # The model-level checks (which blip2_client's is_ready() and wait_until_ready() use) agree.
            assert httpx.get(f"{running.http_url}/v2/models/blip2/ready").status_code == 503
            assert not client.is_model_ready("blip2")
            assert httpx.get(f"{running.http_url}/v2/health/live").status_code == 200
        finally:
            client.close()


def test_api_key_guards_every_route_but_health(triton_server: Any, image: bytes) -> None:
    settings = front_settings(triton_server, metrics_port=-1, api_keys=("old-key", "new-key"))
    with Front(settings) as running:
        http = httpx.Client(base_url=running.http_url)
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/v2/models/blip2").status_code == 401
        assert http.get("/v2/models/blip2", headers={"authorization": "Bearer new-key"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="wrong").models.list()
        ids = [m.id for m in openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="old-key").models.list()]
        assert ids == ["blip2", "blip2_t5"]
        client = grpcclient.InferenceServerClient(running.grpc_url)
        try:
            assert client.is_server_ready()
            with pytest.raises(InferenceServerException) as info:
                client.infer("blip2", build_inputs(grpcclient, image, max_tokens=2))
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            result = client.infer("blip2", build_inputs(grpcclient, image, max_tokens=2),
                                  headers={"authorization": "Bearer old-key"})
            assert result.as_numpy("text_output") is not None
        finally:
            client.close()


def test_triton_down_is_503_everywhere(image: bytes) -> None:
    nowhere = FrontSettings.from_env({}, triton_http=f"127.0.0.1:{free_port()}", triton_grpc=f"127.0.0.1:{free_port()}",
                                     host="127.0.0.1", http_port=0, grpc_port=0, metrics_port=-1)
    with Front(nowhere) as running:
        http = httpx.Client(base_url=running.http_url)
        assert http.get("/v2/health/ready").status_code == 503
        assert http.get("/v2/health/live").status_code == 503
        body = {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}
        response = http.post("/v2/models/blip2/infer", json=body)
        assert response.status_code == 503 and response.json() == {"error": "front: Triton is not reachable"}
        client = openai.OpenAI(base_url=f"{running.http_url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="blip2", messages=chat_messages(data_url(image)), stream=stream)
            assert info.value.status_code == 503 and "Triton is not reachable" in info.value.message
        with pytest.raises(openai.InternalServerError):
            client.models.list()
        grpc_client = grpcclient.InferenceServerClient(running.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as error:
                grpc_client.infer("blip2", build_inputs(grpcclient, image))
            assert error.value.status() == "StatusCode.UNAVAILABLE"
        finally:
            grpc_client.close()


def test_a_missing_image_is_named_on_every_protocol(front: Front) -> None:
    # Triton alone answers "unexpected deadlock, at least one output is not set" for an ensemble without `image`.
    http = httpx.Client(base_url=front.http_url)
    for path, body in (("/v2/models/blip2/generate", {"text_input": "Question: what? Answer:", "max_tokens": 3}),
                       ("/v2/models/blip2_stream/generate_stream", {"max_tokens": 3}),
                       ("/v2/models/blip2/infer", {"inputs": [{"name": "max_tokens", "shape": [1, 1],
                                                               "datatype": "INT32", "data": [3]}]})):
        response = http.post(path, json=body)
        assert response.status_code == 400 and response.json() == {"error": "image: required input is missing"}
    client = grpcclient.InferenceServerClient(front.grpc_url)
    try:
        tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
        tokens.set_data_from_numpy(np.array([[3]], dtype=np.int32))
        with pytest.raises(InferenceServerException) as error:
            client.infer("blip2", [tokens])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "image: required input is missing" in error.value.message()
    finally:
        client.close()


# -- issue 23: the OpenAI-compatible gateway ---------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "controls"), [
    (QUESTION, {"max_tokens": 8}),
    (None, {"max_tokens": 5}),
    (QUESTION, {"max_tokens": 8, "temperature": 0.9, "top_p": 0.8, "seed": 11}),
])
def test_openai_sdk_gets_the_ensembles_text(front: Front, triton_server: Any, image: bytes, prompt: str | None,
                                            controls: dict[str, Any]) -> None:
    expected = direct(triton_server, image, VQA if prompt else None, **controls)
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused")
    messages = chat_messages(data_url(image), prompt)
    completion = client.chat.completions.create(model="blip2", messages=messages, **controls)
    assert completion.choices[0].message.content == expected and completion.object == "chat.completion"
    # Token count and finish reason are the ensemble's own (its optional outputs); the prompt count is the
    # tokenizer's estimate (no ensemble reports one).
    tokens, finish = direct_usage(triton_server, image, VQA if prompt else None, **controls)
    assert completion.usage is not None and completion.usage.completion_tokens == tokens
    assert completion.choices[0].finish_reason == finish
    assert completion.usage.prompt_tokens > 8  # the tiny checkpoint's 8 query tokens, then the prompt's
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="blip2", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **controls))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [completion.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage

    async def asynchronous() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=f"{front.http_url}/v1", api_key="unused") as aclient:
            plain = await aclient.chat.completions.create(model="blip2", messages=messages, **controls)
            stream = await aclient.chat.completions.create(model="blip2", messages=messages, stream=True, **controls)
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return plain.choices[0].message.content or "", "".join(pieces)

    assert asyncio.run(asynchronous()) == (expected, expected)


def test_openai_sdk_flan_t5_and_models(front: Front, triton_server: Any, image: bytes) -> None:
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["blip2", "blip2_t5"]
    assert client.models.retrieve("blip2_t5").id == "blip2_t5"
    completion = client.chat.completions.create(model="blip2_t5", messages=chat_messages(data_url(image)),
                                                max_completion_tokens=6)
    assert completion.choices[0].message.content == direct(triton_server, image, VQA, model="blip2_t5", max_tokens=6)
    # The ensemble reports both counts (num_input_tokens, num_output_tokens): no tokenizer needed.
    usage = completion.usage
    assert usage is not None and 0 < usage.completion_tokens <= 6 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.choices[0].finish_reason == ("length" if usage.completion_tokens == 6 else "stop")


def test_image_urls_from_allowed_hosts_only(front: Front, triton_server: Any, image_server: str,
                                            sample_images: dict[str, bytes]) -> None:
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused")
    completion = client.chat.completions.create(model="blip2", messages=chat_messages(f"{image_server}/cat.png"),
                                                max_tokens=4)
    assert completion.choices[0].message.content == direct(triton_server, sample_images["rgb_png_portrait"], VQA,
                                                           max_tokens=4)
    port = image_server.rsplit(":", 1)[1]
    for url, message in [
        (f"http://localhost:{port}/cat.png", "host 'localhost' is not on this server's image URL allow-list"),
        (f"{image_server}/redirect", "fetching the image returned HTTP 302"),
        (f"{image_server}/big", "expected an image of at most 1048576 bytes, got 2097152"),
        (f"ftp://127.0.0.1:{port}/cat.png", "expected a data: URL or an http(s) URL, got scheme 'ftp'"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="blip2", messages=chat_messages(url))
        assert message in info.value.message, url


@pytest.mark.parametrize(("change", "message"), [
    ({"messages": [{"role": "user", "content": "describe it"}]}, "expected one image"),
    ({"messages": chat_messages("data:image/png;base64,%%%")}, "the data URL is not valid base64"),
    ({"messages": chat_messages("https://images.example.com/cat.jpg")}, "not on this server's image URL allow-list"),
    ({"messages": chat_messages(data_url(b"\xff" * (1 * MIB + 1)))}, "expected an image of at most 1048576 bytes"),
    ({"model": "gpt-4o"}, "model 'gpt-4o' is not served here; expected one of blip2, blip2_t5"),
    ({"n": 2}, "n: not supported by BLIP-2"),
    ({"messages": chat_messages(data_url(b"not an image"))}, "image: bytes are not a supported image file"),
    ({"messages": chat_messages(data_url(b"not an image")), "stream": True},
     "image: bytes are not a supported image file"),
    ({"max_tokens": 100000}, "max_tokens: expected 1..256, got 100000"),
    ({"temperature": -1}, "temperature: expected a finite value >= 0, got -1.0"),
])
def test_bad_requests_get_400_and_the_gateway_stays_up(front: Front, image: bytes, change: dict[str, Any],
                                                       message: str) -> None:
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused", max_retries=0)
    request: dict[str, Any] = {"model": "blip2", "messages": chat_messages(data_url(image)), **change}
    with pytest.raises(openai.BadRequestError) as info:
        result = client.chat.completions.create(**request)
        if request.get("stream"):
            list(result)
    assert info.value.status_code == 400 and message in info.value.message
    assert client.chat.completions.create(model="blip2", messages=chat_messages(data_url(image)),
                                          max_tokens=2).choices[0].message.content is not None


def test_raw_bad_bodies(front: Front) -> None:
    http = httpx.Client(base_url=front.http_url)
    response = http.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert "the body is not valid JSON" in response.json()["error"]["message"]
    deep = http.post("/v1/chat/completions", content=b"[" * 1000 + b"]" * 1000)
    assert deep.status_code == 400 and "nesting at most 32 deep, got 1000" in deep.json()["error"]["message"]


def test_hundreds_of_streams_cancelled_at_once_leave_the_front_up(triton_server: Any, image: bytes,
                                                                   tmp_path: Path) -> None:
    # The front in its own process, as `serve` runs it, so a crash fails this test alone. It used to die of SIGSEGV
    # here: the access log read the peer of a call the client had cancelled.
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path / "front.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "blip2_triton.front", "--triton-http", triton_server.http_hostport,
         "--triton-grpc", triton_server.grpc_url, "--host", "127.0.0.1", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port), "--metrics-port", "-1"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"http://127.0.0.1:{http_port}/v2/health/live"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        for _ in range(5):
            clients = []
            for _ in range(200):
                client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
                client.start_stream(callback=lambda result, error: None)
                client.async_stream_infer("blip2_stream", build_inputs(grpcclient, image, max_tokens=256))
                clients.append(client)
            time.sleep(1.0)
            for client in clients:
                client.stop_stream(cancel_requests=True)
            for client in clients:
                client.close()
            assert process.poll() is None, log.read_text()[-3000:]
        with Blip2Client(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
            assert client.generate(image, VQA, max_tokens=3) == direct(triton_server, image, VQA, max_tokens=3)
    finally:
        process.terminate()
        process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_cancelled_stream_stops_generation(front: Front, triton_server: Any, image: bytes) -> None:
    """A client that leaves a streamed completion cancels the gRPC stream, so the engine stops the sequence."""
    def cancelled() -> float:
        return cancelled_requests(triton_server)

    before = cancelled()
    client = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="unused")
    # Greedy captions of this image run to 256 tokens: the generation is still going when the client leaves.
    stream = client.chat.completions.create(model="blip2", messages=chat_messages(data_url(image), None),
                                            max_tokens=256, stream=True)
    next(iter(stream))
    stream.close()
    deadline = asyncio.run(_wait_for(lambda: cancelled() > before, 30.0))
    assert deadline, "the engine never saw the cancellation"


async def _wait_for(condition: Any, timeout_s: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return False


def test_grpc_stream_infer_through_the_front(front: Front, triton_server: Any, image: bytes) -> None:
    """ModelStreamInfer is passed through message by message; responses carry the request ids the front set."""
    expected = direct(triton_server, image, VQA, max_tokens=5)
    channel = grpc.insecure_channel(front.grpc_url)
    try:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                     request_serializer=pb.ModelInferRequest.SerializeToString,
                                     response_deserializer=pb.ModelStreamInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="blip2_stream")
        for tensor in build_inputs(grpcclient, image, VQA, max_tokens=5):
            request.inputs.append(tensor._get_tensor())
            request.raw_input_contents.append(tensor._get_content())
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        responses = list(call(iter([request]), metadata=(("x-request-id", "s-1"),), timeout=60))
    finally:
        channel.close()
    assert all(not r.error_message for r in responses)
    assert {r.infer_response.id for r in responses} == {"s-1"}
    pieces = [split_bytes_tensor(r.infer_response.raw_output_contents[0])[0].decode()
              for r in responses if r.infer_response.raw_output_contents]
    assert "".join(pieces) == expected


def test_locust_gateway_user_runs_without_failures(front: Front, triton_server: Any, tmp_path: Path) -> None:
    run = run_locust(tmp_path, [
        "--host", front.http_url, "--grpc-url", triton_server.grpc_url, "--metrics-url", triton_server.metrics_url,
        "--load-mode", "fixed", "--fixed-users", "8", "--fixed-duration", "10", "--fixed-interval", "10",
        "--warmup", "2", "--max-tokens", "6", "--vqa-ratio", "0.5", "--request-timeout", "30", "Blip2OpenAIUser",
    ], timeout_s=90)  # fmt: skip
    assert {row[4] for row in run["samples"]} == {"openai-caption", "openai-vqa"}
    assert len(run["samples"]) > 20
