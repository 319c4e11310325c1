"""blip2_client against the real server: every method returns exactly the HF reference text."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from blip2_client import (
    AsyncBlip2Client,
    Blip2Client,
    Generation,
    InvalidInputError,
    StreamingUnsupportedError,
    encode_image,
    vqa_prompt,
)
from PIL import Image

pytestmark = pytest.mark.integration

Reference = Callable[[bytes, "str | None", int], str]

MAX_TOKENS = 12
DEFAULT_MAX_TOKENS = 30  # the contract's server default
QUESTION = "what color is the car?"
PROMPT = "a photo of"


@pytest.fixture(scope="module")
def few(sample_images: dict[str, bytes]) -> dict[str, bytes]:
    names = ["rgb_jpeg", "rgba_png", "gray_l_png", "tiny_1x1"]
    return {n: sample_images[n] for n in names}


def test_single_calls_match_reference(url: str, protocol: str, few: dict[str, bytes], reference: Reference) -> None:
    with Blip2Client(url, protocol=protocol, timeout_s=120) as client:
        for image in few.values():
            assert client.caption(image, max_tokens=MAX_TOKENS) == reference(image, None, MAX_TOKENS)
            assert client.ask(image, QUESTION, max_tokens=MAX_TOKENS) == reference(
                image, vqa_prompt(QUESTION), MAX_TOKENS
            )
            assert client.generate(image, PROMPT, max_tokens=MAX_TOKENS) == reference(image, PROMPT, MAX_TOKENS)
            assert client.generate(image, max_tokens=MAX_TOKENS) == reference(image, None, MAX_TOKENS)
        image = few["rgb_jpeg"]
        assert client.caption(image) == reference(image, None, DEFAULT_MAX_TOKENS)


def test_batches_match_reference(
    url: str, protocol: str, sample_images: dict[str, bytes], reference: Reference
) -> None:
    images = list(sample_images.values())
    assert len(images) >= 12
    prompts = [None if i % 3 == 0 else PROMPT if i % 3 == 1 else vqa_prompt(QUESTION) for i in range(len(images))]
    with Blip2Client(url, protocol=protocol, timeout_s=120, max_concurrency=6) as client:
        assert client.caption_batch(images, max_tokens=MAX_TOKENS) == [
            reference(img, None, MAX_TOKENS) for img in images
        ]
        assert client.ask_batch(images, QUESTION, max_tokens=MAX_TOKENS) == [
            reference(img, vqa_prompt(QUESTION), MAX_TOKENS) for img in images
        ]
        assert client.generate_batch(images, prompts, max_tokens=MAX_TOKENS) == [
            reference(img, p, MAX_TOKENS) for img, p in zip(images, prompts, strict=True)
        ]


def test_async_matches_reference(
    url: str, protocol: str, sample_images: dict[str, bytes], reference: Reference
) -> None:
    images = list(sample_images.values())
    questions = [f"what is in picture {i}?" for i in range(len(images))]

    async def run() -> None:
        async with AsyncBlip2Client(url, protocol=protocol, timeout_s=120, max_concurrency=5) as client:
            image = images[0]
            assert await client.caption(image, max_tokens=MAX_TOKENS) == reference(image, None, MAX_TOKENS)
            assert await client.ask(image, QUESTION, max_tokens=MAX_TOKENS) == reference(
                image, vqa_prompt(QUESTION), MAX_TOKENS
            )
            assert await client.generate(image, PROMPT, max_tokens=MAX_TOKENS) == reference(image, PROMPT, MAX_TOKENS)
            assert await client.caption_batch(images, max_tokens=MAX_TOKENS) == [
                reference(img, None, MAX_TOKENS) for img in images
            ]
            assert await client.ask_batch(images, questions, max_tokens=MAX_TOKENS) == [
                reference(img, vqa_prompt(q), MAX_TOKENS) for img, q in zip(images, questions, strict=True)
            ]
            assert await client.generate_batch(images, PROMPT, max_tokens=MAX_TOKENS) == [
                reference(img, PROMPT, MAX_TOKENS) for img in images
            ]

    asyncio.run(run())


def test_every_image_input_type(
    triton_server: Any, sample_images: dict[str, bytes], reference: Reference, tmp_path: Path
) -> None:
    data = sample_images["rgb_jpeg"]
    path = tmp_path / "car.jpg"
    path.write_bytes(data)
    pil = Image.open(io.BytesIO(data)).convert("RGB")
    arr = np.asarray(pil)
    expected_file = reference(data, None, MAX_TOKENS)
    # PIL images and arrays travel as lossless PNG of the same pixels.
    expected_png = reference(encode_image(pil), None, MAX_TOKENS)
    with Blip2Client(triton_server.grpc_url) as client:
        assert client.caption(path, max_tokens=MAX_TOKENS) == expected_file
        assert client.caption(str(path), max_tokens=MAX_TOKENS) == expected_file
        assert client.caption(bytearray(data), max_tokens=MAX_TOKENS) == expected_file
        with open(path, "rb") as f:
            assert client.caption(f, max_tokens=MAX_TOKENS) == expected_file
        assert client.caption(pil, max_tokens=MAX_TOKENS) == expected_png
        assert client.caption(arr, max_tokens=MAX_TOKENS) == expected_png
        gray = np.asarray(pil.convert("L"))
        assert client.caption(gray, max_tokens=MAX_TOKENS) == reference(encode_image(gray), None, MAX_TOKENS)


def test_controls_reach_the_server(triton_server: Any, sample_images: dict[str, bytes], reference: Reference) -> None:
    image = sample_images["rgb_jpeg"]
    with Blip2Client(triton_server.grpc_url) as client:
        assert client.caption(image, max_tokens=2) == reference(image, None, 2)
        # Every control at once: the server accepts the client's dtypes and shapes.
        sampled = client.caption(
            image,
            max_tokens=MAX_TOKENS,
            temperature=0.7,
            top_p=0.9,
            top_k=20,
            beam_width=1,
            repetition_penalty=1.1,
            seed=5,
        )
        assert isinstance(sampled, str)


def test_health_and_metadata(url: str, protocol: str) -> None:
    with Blip2Client(url, protocol=protocol) as client:
        assert client.is_live()
        assert client.is_ready()
        client.wait_until_ready(10)
        meta = client.model_metadata()
        assert meta.name == "blip2"
        inputs = {t.name: t.datatype for t in meta.inputs}
        assert inputs["image"] == "BYTES"
        assert inputs["max_tokens"] == "INT32"
        assert {t.name: t.datatype for t in meta.outputs} == {"text_output": "BYTES", "num_output_tokens": "INT32",
                                                               "finish_reason": "BYTES", "num_input_tokens": "INT32"}
        # Streaming needs gRPC; over HTTP a clear error, not a hang.
        if protocol == "http":
            with pytest.raises(StreamingUnsupportedError, match="grpc"):
                client.stream(b"unused")

    async def run() -> None:
        async with AsyncBlip2Client(url, protocol=protocol) as client:
            assert await client.is_live()
            assert await client.is_ready()
            await client.wait_until_ready(10)
            assert (await client.model_metadata()).name == "blip2"
            if protocol == "http":
                with pytest.raises(StreamingUnsupportedError):
                    async for _ in client.stream(b"unused"):
                        pass

    asyncio.run(run())


def test_stream_without_a_streaming_model_is_a_clear_error(triton_server) -> None:
    with Blip2Client(triton_server.grpc_url, protocol="grpc", stream_model_name="no_such_stream") as client, \
            pytest.raises(StreamingUnsupportedError, match="no_such_stream"):
        client.stream(b"unused")


def test_invalid_input_over_a_stream_is_an_invalid_input_error(triton_server, sample_images) -> None:
    # A stream's error has no status code; it must still be classified as the same request sent unstreamed.
    data = sample_images["gray_l_png"]
    with Blip2Client(triton_server.grpc_url, protocol="grpc") as client:
        with pytest.raises(InvalidInputError, match="max_tokens") as unstreamed:
            client.caption(data, max_tokens=100_000)
        with pytest.raises(InvalidInputError, match="max_tokens") as streamed:
            list(client.stream(data, None, max_tokens=100_000))
        with pytest.raises(InvalidInputError, match="image"):
            list(client.stream(b"not an image"))
    # The same server message either way (Triton prefixes the ensemble's with "in ensemble 'blip2', ").
    assert streamed.value.message.startswith("max_tokens: expected")
    assert unstreamed.value.message.endswith(streamed.value.message)

    async def run() -> None:
        async with AsyncBlip2Client(triton_server.grpc_url, protocol="grpc") as client:
            with pytest.raises(InvalidInputError, match="max_tokens"):
                async for _ in client.stream(data, None, max_tokens=100_000):
                    pass

    asyncio.run(run())


def test_async_stream_matches_the_reference(triton_server, sample_images, reference) -> None:
    data = sample_images["gray_l_png"]

    async def run() -> list[str]:
        async with AsyncBlip2Client(triton_server.grpc_url, protocol="grpc") as client:
            return [piece async for piece in client.stream(data, None, max_tokens=16)]

    pieces = asyncio.run(run())
    assert "".join(pieces) == reference(data, None, 16)


def test_results_carry_the_count_and_the_finish_reason(url: str, protocol: str, few: dict[str, bytes],
                                                       reference: Reference) -> None:
    image = few["rgb_jpeg"]

    def check(result: Generation, max_tokens: int, prompt: str | None) -> None:
        assert result.text == reference(image, prompt, max_tokens)
        assert result.output_tokens is not None and 0 < result.output_tokens <= max_tokens
        assert result.finish_reason == ("length" if result.output_tokens == max_tokens else "stop")
        assert result.input_tokens is not None and result.input_tokens > 1

    with Blip2Client(url, protocol=protocol, timeout_s=120) as client:
        check(client.generate_result(image, max_tokens=5), 5, None)
        check(client.generate_result(image, vqa_prompt(QUESTION), max_tokens=3), 3, vqa_prompt(QUESTION))

    async def run() -> Generation:
        async with AsyncBlip2Client(url, protocol=protocol, timeout_s=120) as client:
            return await client.generate_result(image, max_tokens=4)

    check(asyncio.run(run()), 4, None)
