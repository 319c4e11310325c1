"""The public HTTP port: KServe v2 routes proxied to Triton's loopback HTTP after the front's checks, health that
includes the supervisor's view, and (from `gateway.py`) the OpenAI routes. Every answer carries `x-request-id`."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import playground
from .common import (
    HEADER_LENGTH,
    REQUEST_ID_HEADER,
    THREAD_SCAN_BYTES,
    ClosingStreamingResponse,
    FrontError,
    FrontState,
    check_json_limits,
    log_access,
    once,
    read_body,
    request_state,
)
from .gateway import Gateway
from .limits import BudgetExhaustedError, request_id

log = logging.getLogger("blip2_triton.front")

MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?(/.*)?$")
# Headers that belong to one connection, not to the request; content-length is recomputed by the client.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "host", "content-length", "authorization"})
RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "trailer", "upgrade", "date", "server"})


class AccessMiddleware:
    """Request id, duration metrics and one access log line per request."""

    def __init__(self, app: ASGIApp, state: FrontState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope).get(REQUEST_ID_HEADER))
        record: dict[str, Any] = scope.setdefault("blip2_front", {})
        record["request_id"] = rid
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                message["headers"] = [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        metrics = self.state.metrics
        metrics.in_flight.labels("http").inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.in_flight.labels("http").dec()
            elapsed = time.perf_counter() - start
            model = record.get("model")
            metrics.request_duration.labels("http", record.get("route", "other"), self.state.model_label(model),
                                             str(status)).observe(elapsed)
            if record.get("rejected"):
                metrics.rejected.labels("http", record["rejected"]).inc()
            if self.state.settings.access_log:
                client = scope.get("client")
                log_access(request_id=rid, protocol="http", method=scope["method"], path=scope["path"],
                           model=model, status=status, duration_s=elapsed, bytes_in=record.get("bytes_in", 0),
                           peer=f"{client[0]}:{client[1]}" if client else None, triton_id=record.get("triton_id"))


def kserve_error(error: FrontError, record: dict[str, Any]) -> JSONResponse:
    if not error.reason.startswith("triton_"):
        record["rejected"] = error.reason
    return JSONResponse({"error": error.message}, status_code=error.http_status)


def _route_of(path: str) -> tuple[str, str | None]:
    """(metrics route label, model named in the path) of a /v2 path."""
    match = MODEL_PATH.match(path)
    if match is None or (match.group(1) == "stats" and not match.group(2)):
        return (path if path in ("/v2", "/v2/models/stats", "/v2/repository/index") else "/v2/other"), None
    suffix = match.group(2) or ""
    return "/v2/models/{model}" + (suffix if suffix in ("/infer", "/generate", "/generate_stream", "/ready",
                                                        "/config", "/stats") else ""), match.group(1)


INFERENCE_ROUTES = ("/infer", "/generate", "/generate_stream")


async def _json_head(body: bytes, headers: dict[str, str]) -> tuple[Any, int | None]:
    """The JSON part of an inference body parsed (None if it is not JSON), and its length when a binary-tensor
    header declares one (None when the header is absent; -1 when it is malformed, which Triton reports itself)."""
    declared = headers.get(HEADER_LENGTH)
    if declared is not None and not (declared.isdigit() and int(declared) <= len(body)):
        return None, -1
    head = body[:int(declared)] if declared is not None else body
    try:
        parsed = (await anyio.to_thread.run_sync(json.loads, head) if len(head) >= THREAD_SCAN_BYTES
                  else json.loads(head))
    except ValueError:
        return None, None  # Triton answers malformed JSON with its own message
    return parsed, int(declared) if declared is not None else None


def _input_names(route: str, parsed: Any) -> set[str] | None:
    """The inputs an inference body names (KServe infer: `inputs[].name`; generate: the body's keys)."""
    if not isinstance(parsed, dict):
        return None
    if route.endswith("/infer"):
        inputs = parsed.get("inputs")
        return {str(i.get("name")) for i in inputs if isinstance(i, dict)} if isinstance(inputs, list) else None
    return set(parsed)


def _with_request_id(body: bytes, headers: dict[str, str], rid: str, parsed: Any, declared: int | None
                     ) -> tuple[bytes, str | None]:
    """The infer body with `id` set to the request id when the client sent none; and the id Triton will see."""
    if declared == -1 or not isinstance(parsed, dict):
        return body, None
    json_length = declared if declared is not None else len(body)
    head = body[:json_length]
    if not head.lstrip().startswith(b"{"):
        return body, None
    if "id" in parsed:
        return body, str(parsed["id"])
    # Inserted as text (the id is a plain token): re-encoding could change how the client wrote its numbers.
    opening = head.index(b"{") + 1
    field = f'"id":"{rid}"'.encode() + (b"," if parsed else b"")
    new_head = head[:opening] + field + head[opening:]
    if declared is not None:
        headers[HEADER_LENGTH] = str(len(new_head))
    return new_head + body[json_length:], rid


async def kserve_proxy(request: Request) -> Response:
    front: FrontState = request.app.state.front
    client: httpx.AsyncClient = request.app.state.triton_http
    record = request_state(request)
    route, model = _route_of(request.url.path)
    record["route"], record["model"] = route, model
    try:
        if model is not None and not front.is_public(model):
            raise FrontError(404, f"front: unknown model '{model}'", reason="internal_model")
        if not front.authorized(request.headers.get("authorization")):
            raise FrontError(401, "front: missing or wrong API key (Authorization: Bearer ...)", reason="auth")
        if route.endswith("/ready") and not front.stages_ready():
            return Response(status_code=503)  # a model is not ready while a stage process is down
        if route.endswith(INFERENCE_ROUTES):
            front.check_serving()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers[REQUEST_ID_HEADER] = record["request_id"]
        body = b""
        if request.method in ("POST", "PUT", "PATCH"):
            body = await read_body(request, front)
            record["bytes_in"] = len(body)
            declared = headers.get(HEADER_LENGTH)
            json_part = body[:int(declared)] if declared and declared.isdigit() else body
            await check_json_limits(json_part, front)
            if route.endswith(INFERENCE_ROUTES):
                parsed, json_length = await _json_head(body, headers)
                names = _input_names(route, parsed)
                if names is not None:
                    front.check_inputs(model, names)
                if route.endswith("/infer"):
                    body, record["triton_id"] = _with_request_id(body, headers, record["request_id"], parsed,
                                                                 json_length)
        held = await front.budget.acquire(len(body)) if body else 0
    except FrontError as e:
        return kserve_error(e, record)
    except BudgetExhaustedError as e:
        return kserve_error(FrontError(503, str(e), reason="budget"), record)
    release = once(lambda: front.budget.release(held))
    path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
    url = f"http://{front.settings.triton_http}{path}"
    if request.url.query:
        url += "?" + request.url.query
    try:
        upstream = await client.send(client.build_request(request.method, url, headers=headers, content=body),
                                     stream=True)
    except httpx.HTTPError as e:
        release()
        status, what = (504, "did not answer in time") if isinstance(e, httpx.TimeoutException) else \
            (503, "is not reachable")
        log.warning("Triton HTTP %s: %s (%s)", what, type(e).__name__, record["request_id"])
        return kserve_error(FrontError(status, f"front: Triton {what}", reason="triton_unavailable"), record)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        finally:
            release()  # first: the await below may be cut short by a cancellation
            await upstream.aclose()

    def cleanup() -> None:
        release()
        if not upstream.is_closed:  # the client left before the body started: close the upstream response too
            asyncio.get_running_loop().create_task(upstream.aclose())

    response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in RESPONSE_DROP}
    return ClosingStreamingResponse(relay(), cleanup=cleanup, status_code=upstream.status_code,
                                    headers=response_headers)



async def _triton_says_ok(request: Request, path: str) -> bool:
    front: FrontState = request.app.state.front
    client: httpx.AsyncClient = request.app.state.triton_http
    try:
        response = await client.get(f"http://{front.settings.triton_http}{path}", timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


async def health_live(request: Request) -> Response:
    request_state(request)["route"] = "/v2/health/live"
    return Response(status_code=200 if await _triton_says_ok(request, "/v2/health/live") else 503)


async def health_ready(request: Request) -> Response:
    request_state(request)["route"] = "/v2/health/ready"
    ready = await _triton_says_ok(request, "/v2/health/ready") and request.app.state.front.stages_ready()
    return Response(status_code=200 if ready else 503)



def build_app(front: FrontState, triton_http: httpx.AsyncClient, gateway: Gateway) -> ASGIApp:
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    routes = [
        Route("/v2/health/live", health_live, methods=["GET", "HEAD"]),
        Route("/v2/health/ready", health_ready, methods=["GET", "HEAD"]),
        *gateway.routes(),
        *(playground.routes() if front.settings.playground else []),
        Route("/v2{rest:path}", kserve_proxy, methods=methods),
    ]
    app = Starlette(routes=routes)
    app.state.front = front
    app.state.triton_http = triton_http
    return AccessMiddleware(app, front)
