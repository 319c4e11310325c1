"""Failure modes against a real server (or a port nobody listens on)."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from blip2_client import (
    AsyncBlip2Client,
    Blip2Client,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
)
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.integration


@pytest.fixture
def dead_url(protocol: str) -> str:
    # Bound then released: nothing listens there for the test's short life.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"


def _raw_server_message(triton_server: Any, protocol: str, image: bytes) -> str:
    """What the server itself says about this image, through plain tritonclient."""
    module: Any = grpcclient if protocol == "grpc" else httpclient
    hostport = triton_server.grpc_url if protocol == "grpc" else triton_server.http_hostport
    tensor = module.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    client = module.InferenceServerClient(hostport)
    try:
        client.infer("blip2", [tensor])
    except InferenceServerException as e:
        return e.message()
    finally:
        client.close()
    raise AssertionError("the server accepted an invalid image")


def test_bad_image_is_invalid_input_with_server_message(triton_server: Any, url: str, protocol: str) -> None:
    expected = _raw_server_message(triton_server, protocol, b"not an image")
    assert expected
    with Blip2Client(url, protocol=protocol) as client:
        with pytest.raises(InvalidInputError) as info:
            client.caption(b"not an image")
        assert info.value.message == expected
        assert info.value.__cause__ is not None
        with pytest.raises(InvalidInputError):
            client.caption_batch([np.zeros((8, 8, 3), np.uint8), b"not an image"])
        # The server is unharmed and the client still usable.
        assert client.caption(np.zeros((8, 8, 3), np.uint8), max_tokens=3) is not None

    async def run() -> None:
        async with AsyncBlip2Client(url, protocol=protocol) as client:
            with pytest.raises(InvalidInputError) as info:
                await client.caption(b"not an image")
            assert info.value.message == expected

    asyncio.run(run())


def test_server_side_control_checks_are_invalid_input(url: str, protocol: str, sample_images: dict[str, bytes]) -> None:
    image = sample_images["tiny_1x1"]
    with Blip2Client(url, protocol=protocol) as client:
        with pytest.raises(InvalidInputError, match="top_p"):
            client.caption(image, top_p=2.0)
        with pytest.raises(InvalidInputError, match="beam_width"):
            client.caption(image, beam_width=2, temperature=0.7)
        with pytest.raises(InvalidInputError, match="max_tokens"):
            client.caption(image, max_tokens=100_000)


def test_stopped_server_is_unavailable_within_deadline(dead_url: str, protocol: str) -> None:
    timeout_s = 5.0
    with Blip2Client(dead_url, protocol=protocol, timeout_s=timeout_s) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            client.caption(b"img")
        assert time.monotonic() - start < timeout_s
        assert not client.is_live()
        assert not client.is_ready()

    async def run() -> None:
        async with AsyncBlip2Client(dead_url, protocol=protocol, timeout_s=timeout_s) as client:
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError):
                await client.caption(b"img")
            assert time.monotonic() - start < timeout_s
            assert not await client.is_ready()

    asyncio.run(run())


def test_unavailable_retries_are_bounded(dead_url: str, protocol: str) -> None:
    with Blip2Client(dead_url, protocol=protocol, timeout_s=5, retries=2, retry_backoff_s=0.1) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            client.caption(b"img")
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 5  # 0.1 + 0.2 of backoff, then give up


def test_wait_until_ready_gives_up(dead_url: str, protocol: str) -> None:
    with Blip2Client(dead_url, protocol=protocol) as client:
        start = time.monotonic()
        with pytest.raises(ServerUnavailableError, match="not ready within"):
            client.wait_until_ready(1.0, poll_interval_s=0.2)
        assert time.monotonic() - start < 3


def test_deadline_shorter_than_generation(url: str, protocol: str, sample_images: dict[str, bytes]) -> None:
    image = sample_images["rgb_jpeg"]
    with Blip2Client(url, protocol=protocol, timeout_s=0.001) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match=r"timeout_s=0\.001"):
            client.caption(image, max_tokens=200)
        assert time.monotonic() - start < 1.0

    async def run() -> None:
        async with AsyncBlip2Client(url, protocol=protocol, timeout_s=0.001) as client:
            with pytest.raises(DeadlineExceededError):
                await client.caption(image, max_tokens=200)

    asyncio.run(run())
    # An abandoned request must not break the server for the next caller.
    with Blip2Client(url, protocol=protocol) as client:
        assert isinstance(client.caption(image, max_tokens=3), str)
