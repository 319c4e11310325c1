from __future__ import annotations

import asyncio
import re
import sys

from tritonclient.utils import InferenceServerException


class Blip2Error(Exception):
    """Base class of every error the client raises for a failed server call.

    `status` is the transport status as tritonclient reports it (e.g. "400",
    "StatusCode.INVALID_ARGUMENT") when there was one.
    """

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidInputError(Blip2Error):
    """The server rejected the request; `message` is the server's own text."""


class ServerUnavailableError(Blip2Error):
    """The server (or the model) cannot serve right now; retrying may help."""


class DeadlineExceededError(Blip2Error):
    """The call did not finish within the client's deadline (`timeout_s`)."""


class StreamingUnsupportedError(Blip2Error):
    """Token streaming was requested but the server/protocol does not offer it."""


# The python backend reports a crashed or restarting stub with this text, and in some
# versions with an INVALID_ARG (HTTP 400) status; it is a server fault, never the
# caller's, so the message wins over the status code.
_STUB_UNHEALTHY = re.compile(
    r"stub process\b.*\b(not healthy|unhealthy)|failed to restart the stub process", re.IGNORECASE
)
# Triton answers for a model that is missing, loading or unloaded; a deployment
# that is still starting looks like this, so it counts as unavailable.
_MODEL_NOT_SERVING = re.compile(r"\bunknown model\b|\bis not at ready state\b", re.IGNORECASE)

# A gRPC stream's error carries only a message, no status. The server's invalid-input messages start with the
# input at fault (docs/CONTRACT.md), which classifies them as the same request sent unstreamed would be.
_SERVER_INVALID_INPUT = re.compile(
    r"^(?:image|text_input|max_tokens|temperature|top_p|top_k|beam_width|repetition_penalty|seed|streaming)\b"
)

_UNAVAILABLE_STATUS = {"StatusCode.UNAVAILABLE", "503", "StatusCode.NOT_FOUND", "404"}
_DEADLINE_STATUS = {"StatusCode.DEADLINE_EXCEEDED", "504", "408"}
_INVALID_STATUS = {"StatusCode.INVALID_ARGUMENT", "400"}

# socket.timeout is TimeoutError since 3.10; asyncio.TimeoutError only since 3.11.
_TIMEOUT_TYPES: tuple[type[BaseException], ...] = (TimeoutError, asyncio.TimeoutError)


def _from_server_exception(exc: InferenceServerException) -> Blip2Error:
    status = exc.status()
    message = exc.message() or str(exc)
    if _STUB_UNHEALTHY.search(message):
        return ServerUnavailableError(message, status=status)
    if status in _DEADLINE_STATUS:
        return DeadlineExceededError(message, status=status)
    if status in _UNAVAILABLE_STATUS:
        return ServerUnavailableError(message, status=status)
    if status in _INVALID_STATUS:
        # Older servers send "unknown model" with 400.
        if _MODEL_NOT_SERVING.search(message):
            return ServerUnavailableError(message, status=status)
        return InvalidInputError(message, status=status)
    if status is None and message == "failed to obtain inference response":
        return DeadlineExceededError(message)
    if status is None and _SERVER_INVALID_INPUT.match(message):
        return InvalidInputError(message)
    return Blip2Error(message, status=status)


def _is_closed_connection(exc: BaseException) -> bool:
    # geventhttpclient's HTTPConnectionClosed (a server that stops or drains closes the connection mid-request)
    # is an http.client.HTTPException, not an OSError.
    return type(exc).__name__ in ("HTTPConnectionClosed", "RemoteDisconnected", "IncompleteRead")


def _is_aiohttp_connection_error(exc: BaseException) -> bool:
    aiohttp = sys.modules.get("aiohttp")
    return aiohttp is not None and isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))


def _grpc_error_as_server_exception(exc: BaseException) -> InferenceServerException | None:
    # tritonclient wraps most grpc.RpcErrors, but not those raised while iterating
    # an aio stream.
    grpc = sys.modules.get("grpc")
    if grpc is None or not isinstance(exc, grpc.RpcError):
        return None
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if not (callable(code) and callable(details)):
        return None
    return InferenceServerException(msg=details() or str(exc), status=str(code()))


def map_error(exc: BaseException) -> Blip2Error:
    """Translate a tritonclient/transport exception into the client's hierarchy."""
    if isinstance(exc, Blip2Error):
        return exc
    exc = _grpc_error_as_server_exception(exc) or exc
    if isinstance(exc, InferenceServerException):
        return _from_server_exception(exc)
    # Checked before connection errors: aiohttp's ServerTimeoutError is both.
    if isinstance(exc, _TIMEOUT_TYPES):
        return DeadlineExceededError(str(exc) or "deadline exceeded")
    if isinstance(exc, OSError) or _is_aiohttp_connection_error(exc) or _is_closed_connection(exc):
        return ServerUnavailableError(str(exc) or type(exc).__name__)
    return Blip2Error(f"{type(exc).__name__}: {exc}")
