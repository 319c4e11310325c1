"""Property-based robustness against the real server: random image bytes (raw, behind real image magic numbers,
or mutated real images), random prompts and random control values, sent a few at a time so they share dynamic
batches. Whatever the input, every request answers within the client timeout with either text or INVALID_ARG,
and the server stays ready."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from images import mutated_images
from images import sample_images as _sample_images
from triton_helpers import build_inputs
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration

SAMPLES = _sample_images()
TIMEOUT_S = 120
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x10\x00\x00WEBPVP8 ", b"BM", b"II*\x00",
         b"MM\x00*", b"%PDF-1.7", b"<svg"]

f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
images = st.one_of(
    st.binary(max_size=1024),
    st.tuples(st.sampled_from(MAGIC), st.binary(max_size=1024)).map(lambda t: t[0] + t[1]),
    mutated_images(SAMPLES, edits=(0, 12), limits=(64, 512)),
    st.sampled_from(sorted(SAMPLES)).map(SAMPLES.__getitem__),
)
prompts = st.one_of(st.none(), st.text(max_size=200), st.binary(max_size=200))
any_controls = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(st.integers(-3, 24), st.integers(-(2**31), 2**31 - 1)),
    "temperature": st.one_of(f32, st.sampled_from([0.0, 1e-30, 1e-45, 3.4e38])),
    "top_p": st.one_of(f32, st.sampled_from([1e-30, 1.0])),
    "top_k": st.one_of(st.integers(-2, 64), st.integers(-(2**31), 2**31 - 1)),
    "beam_width": st.integers(-2, 10),
    "repetition_penalty": st.one_of(f32, st.sampled_from([1e-30, 3.4e38])),
    "seed": st.integers(0, 2**64 - 1),
})
# In range, so generation really runs with them (sampling, beams, penalties) next to the hostile ones.
valid_controls = st.fixed_dictionaries({"max_tokens": st.integers(1, 30)}, optional={
    "temperature": st.floats(0, 5, width=32),
    "top_p": st.floats(0.015625, 1, width=32),
    "top_k": st.integers(0, 50),
    "repetition_penalty": st.floats(0.5, 2, width=32),
    "seed": st.integers(0, 2**64 - 1),
})
controls = st.one_of(any_controls, valid_controls, valid_controls.map(lambda c: {**c, "beam_width": 3}))
requests = st.lists(st.tuples(images, prompts, controls), min_size=1, max_size=4)


def _send(url: str, image: bytes, prompt: str | bytes | None, ctrl: dict[str, Any]) -> tuple[str, str]:
    inputs = build_inputs(grpcclient, image, prompt, **ctrl)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer("blip2", inputs, client_timeout=TIMEOUT_S)
        return "ok", result.as_numpy("text_output")[0, 0].decode("utf-8")
    except InferenceServerException as e:
        return str(e.status()), e.message() or ""
    finally:
        client.close()


@settings(max_examples=150, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=requests)
# Numeric edges of valid controls: they must generate (or be refused), never fail the batch.
@example(batch=[(SAMPLES["bmp"], None, {"temperature": 1e-30, "seed": 1}),
                (SAMPLES["bmp"], None, {"top_p": 1e-30, "seed": 2}),
                (SAMPLES["bmp"], None, {"temperature": 3.4e38, "top_k": 2**31 - 1}),
                (SAMPLES["bmp"], None, {"repetition_penalty": 3.4e38, "max_tokens": 5})])
@example(batch=[(SAMPLES["bmp"], "Question: a? Answer:", {"beam_width": 8, "max_tokens": 256}),
                (SAMPLES["tiny_1x1"], None, {"repetition_penalty": 1e-30, "max_tokens": 5})])
def test_random_requests_never_hang_or_break_the_server(triton_server: Any, batch: list[Any]) -> None:
    with ThreadPoolExecutor(max_workers=len(batch)) as pool:
        outcomes = list(pool.map(lambda r: _send(triton_server.grpc_url, *r), batch))
    for (status, message), request in zip(outcomes, batch, strict=True):
        # A timeout shows as DEADLINE_EXCEEDED, a crash as INTERNAL/UNAVAILABLE: only these two are acceptable.
        assert status in ("ok", "StatusCode.INVALID_ARGUMENT"), (status, message, request[1:])
        if status != "ok":
            assert message, "an error without a message"
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        assert client.is_server_ready()
    finally:
        client.close()
