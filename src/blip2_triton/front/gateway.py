"""OpenAI-compatible routes: `/v1/models` and `/v1/chat/completions` (plain and server-sent events), answered
from the `blip2` ensembles over Triton's loopback gRPC."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from .common import (
    THREAD_SCAN_BYTES,
    ClosingStreamingResponse,
    FrontError,
    FrontState,
    check_json_limits,
    once,
    read_body,
    request_state,
)
from .images import image_bytes
from .limits import BudgetExhaustedError
from .openai_api import (
    ChatRequest,
    ChatRequestError,
    Usage,
    chat_prompt,
    chunk_body,
    completion_body,
    error_body,
    sse,
    usage_chunk_body,
)
from .triton import (
    TEXT_OUTPUT,
    USAGE_OUTPUTS,
    http_status_for,
    infer_request,
    is_final,
    response_outputs,
    text_of,
)

log = logging.getLogger("blip2_triton.front.gateway")
# The contract's max_tokens default (BLIP2_DEFAULT_MAX_TOKENS), for telling "length" from "stop" by estimate.
DEFAULT_MAX_TOKENS = 30
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
    # Triton is on loopback and comes back within seconds of a restart: reconnect at once, not after gRPC's
    # default backoff of up to two minutes, during which every request would fail while readiness says yes.
    ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TokenCounter:
    """Usage estimates from a checkpoint's tokenizer, for ensembles that do not report token counts."""

    def __init__(self, source: str) -> None:
        from tokenizers import Tokenizer

        path = Path(source)
        directory = path if path.is_dir() else path.parent
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json" if path.is_dir() else path))
        config = directory / "config.json"
        # The language model reads the image as this many query tokens before the prompt.
        self.query_tokens = int(json.loads(config.read_text()).get("num_query_tokens", 0)) if config.exists() else 0

    def prompt_tokens(self, prompt: str | None) -> int:
        return self.query_tokens + len(self.tokenizer.encode(prompt or "").ids)

    def completion_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


class Gateway:
    def __init__(self, front: FrontState, channel: grpc.aio.Channel, image_client: httpx.AsyncClient) -> None:
        self.front = front
        self.settings = front.settings
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.image_client = image_client
        self._outputs: dict[str, tuple[str, ...]] = {}
        self._counters: dict[str, TokenCounter | None] = {}
        self._warned_usage = False

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]

    # -- models ---------------------------------------------------------------------------------------------

    async def _served(self) -> list[str]:
        served = []
        for model_id, (plain, _) in self.settings.openai_models.items():
            try:
                answer = await self.stub.ModelReady(pb.ModelReadyRequest(name=plain), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise FrontError(503, "Triton is not reachable", reason="triton_unavailable") from e
                continue
            if answer.ready:
                served.append(model_id)
        return served

    def _model_card(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(self.front.started), "owned_by": "blip2-triton"}

    async def list_models(self, request: Request) -> Response:
        request_state(request)["route"] = "/v1/models"
        try:
            self._authorize(request)
            served = await self._served()
        except FrontError as e:
            return self._error(request, e)
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in served]})

    async def get_model(self, request: Request) -> Response:
        record = request_state(request)
        record["route"] = "/v1/models/{model}"
        model_id = request.path_params["model_id"]
        try:
            self._authorize(request)
            if model_id not in await self._served():
                raise FrontError(404, f"model '{model_id}' is not served here", reason="unknown_model",
                                 param="model", code="model_not_found")
        except FrontError as e:
            return self._error(request, e)
        record["model"] = model_id
        return JSONResponse(self._model_card(model_id))

    # -- chat completions -----------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        record = request_state(request)
        record["route"] = "/v1/chat/completions"
        started = time.perf_counter()
        held = 0
        try:
            self._authorize(request)
            self.front.check_serving()
            body = await read_body(request, self.front)
            record["bytes_in"] = len(body)
            await check_json_limits(body, self.front)
            chat = await self._parse(body)
            record["model"] = chat.model
            plain, stream_model = self._ensembles(chat.model)
            image = await image_bytes(chat.image, self.image_client, allowed_hosts=self.settings.image_url_hosts,
                                      max_bytes=self.settings.max_image_bytes,
                                      timeout_s=self.settings.image_fetch_timeout_s)
            prompt = chat_prompt(chat.messages, self.settings.prompt_template, self.settings.chat_history)
            model = stream_model if chat.stream else plain
            outputs = (TEXT_OUTPUT, *await self._usage_outputs(model))
            held = await self.front.budget.acquire(len(image))
            triton_request = infer_request(model, record["request_id"], image, prompt, chat.controls(), outputs,
                                           stream=chat.stream)
            if chat.stream:
                to_release, held = held, 0  # the stream gives it back when it ends
                return await self._stream(request, chat, prompt, triton_request, started, to_release)
            return await self._complete(request, chat, prompt, triton_request)
        except FrontError as e:
            return self._error(request, e)
        except ChatRequestError as e:
            return self._error(request, FrontError(400, str(e), reason="invalid_request", param=e.param,
                                                   code=e.code))
        except BudgetExhaustedError as e:
            return self._error(request, FrontError(503, str(e), reason="budget"))
        finally:
            if held:
                self.front.budget.release(held)

    def _authorize(self, request: Request) -> None:
        if not self.front.authorized(request.headers.get("authorization")):
            raise FrontError(401, "missing or wrong API key (Authorization: Bearer ...)", reason="auth",
                             code="invalid_api_key")

    async def _parse(self, body: bytes) -> ChatRequest:
        try:
            parsed = await anyio.to_thread.run_sync(json.loads, body) if len(body) >= THREAD_SCAN_BYTES \
                else json.loads(body)
        except ValueError as e:
            raise ChatRequestError(None, f"the body is not valid JSON ({e})") from e
        return ChatRequest.from_json(parsed)

    def _ensembles(self, model_id: str) -> tuple[str, str]:
        models = self.settings.openai_models
        if model_id not in models:
            raise FrontError(400, f"model '{model_id}' is not served here; expected one of "
                             f"{', '.join(sorted(models))}", reason="unknown_model", param="model",
                             code="model_not_found")
        return models[model_id]

    async def _usage_outputs(self, model: str) -> tuple[str, ...]:
        """The optional usage outputs this model has (asked once; an ensemble without them gets none)."""
        if model not in self._outputs:
            try:
                metadata = await self.stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                raise self._triton_error(e.code(), e.details() or "") from e
            names = {output.name for output in metadata.outputs}
            self._outputs[model] = tuple(name for name in USAGE_OUTPUTS if name in names)
        return self._outputs[model]

    def _triton_error(self, code: grpc.StatusCode | None, message: str) -> FrontError:
        status = http_status_for(code, message)
        if status == 503 and code == grpc.StatusCode.UNAVAILABLE:
            message = f"Triton is not reachable ({message})"
        return FrontError(status, message, reason="triton_error" if status != 400 else "triton_invalid_input",
                          code="model_not_ready" if code == grpc.StatusCode.NOT_FOUND else None)

    def _metadata(self, request: Request) -> tuple[tuple[str, str], ...]:
        return (("x-request-id", request_state(request)["request_id"]),)

    async def _complete(self, request: Request, chat: ChatRequest, prompt: str | None,
                        triton_request: pb.ModelInferRequest) -> Response:
        try:
            answer = await self.stub.ModelInfer(triton_request, timeout=self.settings.request_timeout_s,
                                                metadata=self._metadata(request))
        except grpc.aio.AioRpcError as e:
            raise self._triton_error(e.code(), e.details() or "") from e
        outputs = response_outputs(answer)
        text = text_of(outputs)
        usage, finish = self._usage(chat, prompt, text, outputs)
        rid = request_state(request)["request_id"]
        return JSONResponse(completion_body(f"chatcmpl-{rid}", int(time.time()), chat.model, text, finish, usage))

    async def _stream(self, request: Request, chat: ChatRequest, prompt: str | None,
                      triton_request: pb.ModelInferRequest, started: float, held: int) -> Response:
        call = self.stub.ModelStreamInfer(timeout=self.settings.request_timeout_s, metadata=self._metadata(request))

        def close() -> None:
            # A client that went away cancels the stream, which stops its sequence in the engine.
            call.cancel()
            self.front.budget.release(held)

        close = once(close)
        try:
            await call.write(triton_request)
            await call.done_writing()
            # The first answer decides the status: an invalid image or prompt fails before any text exists.
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            close()
            raise self._triton_error(e.code(), e.details() or "") from e
        except BaseException:
            close()
            raise
        if first is grpc.aio.EOF or first.error_message:
            close()
            message = "stream ended without an answer" if first is grpc.aio.EOF else first.error_message
            raise self._triton_error(None, message)
        rid = request_state(request)["request_id"]
        return ClosingStreamingResponse(self._events(call, first, chat, prompt, rid, started, close), cleanup=close,
                                        media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def _events(self, call: Any, first: pb.ModelStreamInferResponse, chat: ChatRequest, prompt: str | None,
                      rid: str, started: float, close: Callable[[], None]) -> AsyncIterator[bytes]:
        completion_id, created = f"chatcmpl-{rid}", int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            return sse(chunk_body(completion_id, created, chat.model, delta, finish,
                                  with_usage_field=chat.include_usage))

        pieces: list[str] = []
        outputs: dict[str, Any] = {}
        first_token_seen = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            message: Any = first
            while True:
                if message.error_message:
                    # Headers are gone: OpenAI's SDKs raise on an event that carries an error object.
                    status = http_status_for(None, message.error_message)
                    yield sse(error_body(status, message.error_message))
                    break
                response = message.infer_response
                values = response_outputs(response)
                outputs.update({k: v for k, v in values.items() if k != TEXT_OUTPUT})
                piece = text_of(values)
                if piece:
                    if not first_token_seen:
                        first_token_seen = True
                        self.front.metrics.time_to_first_token.labels(self.front.model_label(chat.model)).observe(
                            time.perf_counter() - started)
                    pieces.append(piece)
                    yield chunk({"content": piece})
                if is_final(response):
                    usage, finish = self._usage(chat, prompt, "".join(pieces), outputs)
                    yield chunk({}, finish)
                    if chat.include_usage:
                        yield sse(usage_chunk_body(completion_id, created, chat.model, usage))
                    break
                message = await call.read()
                if message is grpc.aio.EOF:
                    yield sse(error_body(502, "the stream ended before its final response"))
                    break
            yield sse("[DONE]")
        except grpc.aio.AioRpcError as e:
            yield sse(error_body(http_status_for(e.code(), e.details() or ""), e.details() or str(e.code())))
            yield sse("[DONE]")
        finally:
            close()

    # -- usage ----------------------------------------------------------------------------------------------

    def _counter(self, model_id: str) -> TokenCounter | None:
        if model_id not in self._counters:
            source = self.settings.tokenizers.get(model_id)
            counter = None
            if source and self.settings.usage_fallback:
                try:
                    counter = TokenCounter(source)
                except Exception:
                    log.exception("tokenizer for %s could not be loaded from %s; usage left out", model_id, source)
            self._counters[model_id] = counter
        return self._counters[model_id]

    def _usage(self, chat: ChatRequest, prompt: str | None, text: str,
               outputs: dict[str, Any]) -> tuple[Usage | None, str]:
        usage, finish = resolve_usage(outputs, self._counter(chat.model), prompt, text, chat.max_tokens)
        if usage is None and not self._warned_usage:
            self._warned_usage = True
            log.warning("%s: no token counts from the ensemble or a tokenizer: responses carry no usage%s",
                        chat.model, "" if "finish_reason" in outputs else " and finish_reason is always 'stop'")
        if usage is not None:
            self.front.metrics.completion_tokens.labels(self.front.model_label(chat.model)).inc(
                usage.completion_tokens)
        return usage, finish

    def _error(self, request: Request, error: FrontError) -> JSONResponse:
        record = request_state(request)
        if not error.reason.startswith("triton_"):  # Triton's own answers are not refusals of the front
            record["rejected"] = error.reason
        if error.http_status >= 500:
            log.warning("%s: %s (%s)", record.get("route"), error.message, record.get("request_id"))
        return JSONResponse(error_body(error.http_status, error.message, param=error.param, code=error.code),
                            status_code=error.http_status)


def resolve_usage(outputs: dict[str, Any], counter: TokenCounter | None, prompt: str | None, text: str,
                  max_tokens: int | None) -> tuple[Usage | None, str]:
    """Usage and finish_reason: what the ensemble reports (its optional outputs) first, else the tokenizer's
    estimate, else no usage and "stop"."""
    reported_finish = outputs.get("finish_reason")
    finish = reported_finish[0].decode() if isinstance(reported_finish, list) and reported_finish else None
    completion = _first_int(outputs.get("num_output_tokens"))
    prompt_count = _first_int(outputs.get("num_input_tokens"))
    if counter is not None:
        if completion is None:
            completion = counter.completion_tokens(text)
        if prompt_count is None:
            prompt_count = counter.prompt_tokens(prompt)
    if finish is None:
        finish = "length" if completion is not None and completion >= (max_tokens or DEFAULT_MAX_TOKENS) else "stop"
    if completion is None or prompt_count is None:
        return None, finish
    return Usage(prompt_count, completion), finish


def _first_int(value: Any) -> int | None:
    if value is None or isinstance(value, list) or len(value) == 0:
        return None
    return int(value[0])
