from __future__ import annotations

import asyncio
import socket

import aiohttp
import grpc
import pytest
from blip2_client import (
    Blip2Error,
    DeadlineExceededError,
    InvalidInputError,
    ServerUnavailableError,
    StreamingUnsupportedError,
)
from blip2_client._errors import map_error
from tritonclient.utils import InferenceServerException

STUB = (
    "Failed to process the request(s) for model instance 'blip2_llm_0_0', "
    "message: Stub process 'blip2_llm_0_0' is not healthy."
)


def test_one_base_class() -> None:
    for cls in (InvalidInputError, ServerUnavailableError, DeadlineExceededError, StreamingUnsupportedError):
        assert issubclass(cls, Blip2Error)
    assert not issubclass(DeadlineExceededError, ServerUnavailableError)


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("400", "image: cannot decode image bytes", InvalidInputError),
        ("StatusCode.INVALID_ARGUMENT", "prompt too long: 300 tokens > 256", InvalidInputError),
        # A dead python-backend stub arrives as INVALID_ARG/400 but is the server's fault.
        ("400", STUB, ServerUnavailableError),
        ("StatusCode.INVALID_ARGUMENT", STUB, ServerUnavailableError),
        ("500", STUB, ServerUnavailableError),
        ("StatusCode.INTERNAL", "Stub process is unhealthy and it will be restarted.", ServerUnavailableError),
        ("503", "Server not ready", ServerUnavailableError),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailableError),
        ("404", "Request for unknown model: 'blip2' is not found", ServerUnavailableError),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'blip2' is not found", ServerUnavailableError),
        ("400", "Request for unknown model: 'blip2' has no available versions", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceededError),
        ("500", "CUDA out of memory", Blip2Error),
        ("StatusCode.INTERNAL", "boom", Blip2Error),
        (None, "failed to obtain inference response", DeadlineExceededError),
        (None, "something", Blip2Error),
        # A gRPC stream's errors carry no status: the server's input-error messages name the input first.
        (None, "max_tokens: expected 1..256, got 100000", InvalidInputError),
        (None, "image: bytes are not a supported image file", InvalidInputError),
        (None, "beam_width > 1 cannot be combined with sampling (temperature/top_p/top_k)", InvalidInputError),
        (None, "llm stage failed; see server log", Blip2Error),
        (None, "stream failed; see server log", Blip2Error),
        (None, "imagenet outage", Blip2Error),
    ],
)
def test_server_exceptions(status: str | None, message: str, expected: type[Blip2Error]) -> None:
    err = map_error(InferenceServerException(msg=message, status=status))
    assert type(err) is expected
    # The server's text is kept verbatim, without tritonclient's "[status]" prefix.
    assert err.message == message
    assert str(err) == message
    assert err.status == status


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(111, "Connection refused"), ServerUnavailableError),
        (ConnectionResetError(104, "Connection reset by peer"), ServerUnavailableError),
        (BrokenPipeError(32, "Broken pipe"), ServerUnavailableError),
        (socket.gaierror(-2, "Name or service not known"), ServerUnavailableError),
        (TimeoutError("timed out"), DeadlineExceededError),
        (asyncio.TimeoutError(), DeadlineExceededError),
        (aiohttp.ServerDisconnectedError(), ServerUnavailableError),
        (aiohttp.ServerTimeoutError("read timeout"), DeadlineExceededError),
        (RuntimeError("weird"), Blip2Error),
    ],
)
def test_transport_exceptions(exc: BaseException, expected: type[Blip2Error]) -> None:
    assert type(map_error(exc)) is expected


def test_aiohttp_connection_errors() -> None:
    # ClientConnectorError (refused) needs a ConnectionKey whose fields vary by aiohttp
    # version; it is exercised against a real closed port in the integration tests.
    assert type(map_error(aiohttp.ClientOSError(111, "Connect call failed"))) is ServerUnavailableError
    assert type(map_error(aiohttp.ClientPayloadError("truncated"))) is ServerUnavailableError


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.UNAVAILABLE, ServerUnavailableError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError),
    ],
)
def test_raw_grpc_errors(code: grpc.StatusCode, expected: type[Blip2Error]) -> None:
    err = map_error(_RpcError(code, "details here"))
    assert type(err) is expected
    assert err.message == "details here"
    assert err.status == str(code)


def test_blip2_errors_pass_through() -> None:
    err = InvalidInputError("x")
    assert map_error(err) is err


def test_a_connection_closed_mid_request_is_unavailable() -> None:
    from blip2_client._errors import ServerUnavailableError as Unavailable
    from blip2_client._errors import map_error as mapped
    from geventhttpclient.response import HTTPConnectionClosed

    assert isinstance(mapped(HTTPConnectionClosed("connection closed.")), Unavailable)
