"""What both public protocols share: the model allow-list, API keys, reading a body within the limits, access
log lines and request metrics."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .limits import ByteBudget, JsonLimitError, check_json
from .metrics import FrontMetrics
from .settings import FrontSettings

access_log = logging.getLogger("blip2_triton.front.access")
HEADER_LENGTH = "inference-header-content-length"
REQUEST_ID_HEADER = "x-request-id"
# Scanning a body of this size or more moves to a worker thread so the event loop keeps serving.
THREAD_SCAN_BYTES = 1 << 20


class FrontError(Exception):
    """A request the front answers itself: an HTTP status, the matching gRPC status and a message."""

    def __init__(self, http_status: int, message: str, *, reason: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.reason = reason  # the metrics label of a refusal
        self.param = param
        self.code = code


@dataclass
class FrontState:
    """Everything a request handler needs, built once per running front (inside its event loop)."""

    settings: FrontSettings
    metrics: FrontMetrics
    budget: ByteBudget
    ready: Callable[[], bool]
    started: float = field(default_factory=time.time)

    def is_public(self, model: str) -> bool:
        return model in self.settings.public_models

    def authorized(self, header: str | None) -> bool:
        keys = self.settings.api_keys
        if not keys:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Every key is compared (constant time each), so timing does not tell which one nearly matched.
        matches = [hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys]
        return any(matches)

    def stages_ready(self) -> bool:
        try:
            return bool(self.ready())
        except Exception:
            logging.getLogger("blip2_triton.front").exception("the ready() callable failed; answering not ready")
            return False

    def check_inputs(self, model: str | None, names: set[str]) -> None:
        """A 400 naming the first input `model` needs that a request lacks."""
        needed = self.settings.required_inputs.get(model or "", "")
        missing = [name for name in needed.split("+") if name and name not in names]
        if missing:
            raise FrontError(400, f"{missing[0]}: required input is missing", reason="missing_input")

    def check_serving(self) -> None:
        """Inference goes through only while the stages are healthy: a request reaching a paused stage would make
        Triton 2.51 give it up for good (docs/ROBUSTNESS.md), so it is turned away, retryable, instead."""
        if not self.stages_ready():
            raise FrontError(503, "front: the server is not ready (a stage is paused, restarting or draining); "
                             "retry", reason="not_ready")

    def model_label(self, model: str | None) -> str:
        # Only known names become label values: clients choose the names, and labels must stay bounded.
        if model and (model in self.settings.public_models or model in self.settings.openai_models):
            return model
        return "-" if not model else "other"


async def read_body(request: Request, state: FrontState) -> bytes:
    limit = state.settings.max_request_bytes
    if request.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        # A compressed body would be inflated inside Triton, past every limit checked here.
        raise FrontError(415, "front: compressed request bodies (Content-Encoding) are not accepted",
                         reason="content_encoding")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise FrontError(413, f"front: request body of {declared} bytes is over the limit of {limit} bytes",
                         reason="too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FrontError(413, f"front: request body is over the limit of {limit} bytes", reason="too_large")
    return bytes(body)


async def check_json_limits(data: bytes, state: FrontState) -> None:
    try:
        if len(data) >= THREAD_SCAN_BYTES:
            await anyio.to_thread.run_sync(check_json, data, state.settings.max_json_depth)
        else:
            check_json(data, state.settings.max_json_depth)
    except JsonLimitError as e:
        raise FrontError(413 if e.too_large else 400, f"front: {e}", reason="json_limits") from e


def log_access(*, request_id: str, protocol: str, method: str, path: str, model: str | None, status: int | str,
               duration_s: float, bytes_in: int, peer: str | None, triton_id: str | None = None) -> None:
    fields: dict[str, Any] = {"request_id": request_id, "protocol": protocol, "method": method, "path": path,
                              "model": model, "status": status, "duration_ms": round(duration_s * 1000, 3),
                              "bytes_in": bytes_in, "peer": peer}
    if triton_id is not None and triton_id != request_id:
        fields["triton_id"] = triton_id  # the client's own inference request id, which Triton saw instead
    access_log.info("%s %s %s %s %s %.1f ms", request_id, protocol, method, path, status, duration_s * 1000,
                    extra=fields)


def request_state(request: Request) -> dict[str, Any]:
    """The per-request record handlers fill in (model, bytes) for the access log and metrics."""
    return request.scope.setdefault("blip2_front", {})


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response whose `cleanup` runs however it ends: finished, failed, or the client gone before the
    first byte (when the body generator never starts, its own `finally` never runs)."""

    def __init__(self, content: Any, *, cleanup: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def once(action: Callable[[], None]) -> Callable[[], None]:
    done = False

    def run() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return run
