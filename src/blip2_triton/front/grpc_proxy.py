"""The public gRPC port: Triton's KServe v2 `GRPCInferenceService` passed through to its loopback gRPC as raw
bytes, after the front's checks (message size, model allow-list, API key, in-flight bytes), unary and the
bidirectional `ModelStreamInfer` alike. A message over `max_request_bytes` is refused by gRPC itself
(RESOURCE_EXHAUSTED) before any handler, let alone Triton, sees it."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from .common import FrontError, FrontState, log_access
from .limits import BudgetExhaustedError, request_id
from .wire import WireError, string_fields, submessage_strings, with_string_field

log = logging.getLogger("blip2_triton.front.grpc")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
PREFIX = f"/{SERVICE.full_name}/"
STREAM = PREFIX + "ModelStreamInfer"
INFER = PREFIX + "ModelInfer"
SERVER_READY = PREFIX + "ServerReady"
# Health stays open without an API key: probes and load balancers call it.
OPEN_METHODS = frozenset({PREFIX + "ServerLive", SERVER_READY})
# Readiness answers that also need the supervisor's view of the stage processes, and what "not ready" is.
READY_METHODS = {SERVER_READY: pb.ServerReadyResponse(ready=False).SerializeToString(),
                 PREFIX + "ModelReady": pb.ModelReadyResponse(ready=False).SerializeToString()}


def _number(message: Any, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


INPUTS_FIELD = _number(pb.ModelInferRequest, "inputs")
INPUT_NAME_FIELD = _number(pb.ModelInferRequest.InferInputTensor, "name")
# Method -> (field number of the model name, field number of the request id or None).
MODEL_FIELDS: dict[str, tuple[int, int | None]] = {
    INFER: (_number(pb.ModelInferRequest, "model_name"), _number(pb.ModelInferRequest, "id")),
    STREAM: (_number(pb.ModelInferRequest, "model_name"), _number(pb.ModelInferRequest, "id")),
    PREFIX + "ModelMetadata": (_number(pb.ModelMetadataRequest, "name"), None),
    PREFIX + "ModelConfig": (_number(pb.ModelConfigRequest, "name"), None),
    PREFIX + "ModelReady": (_number(pb.ModelReadyRequest, "name"), None),
    PREFIX + "ModelStatistics": (_number(pb.ModelStatisticsRequest, "name"), None),
}
# Statistics without a name are the aggregate over all models.
EMPTY_NAME_ALLOWED = frozenset({PREFIX + "ModelStatistics"})
GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
              503: grpc.StatusCode.UNAVAILABLE}
# Metadata that belongs to this hop, not to the call.
DROPPED_METADATA = frozenset({"authorization", "user-agent", "te", "content-type", "host", "x-request-id"})
_END = object()


def grpc_code(error: FrontError) -> grpc.StatusCode:
    if error.reason == "budget":
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return GRPC_CODES.get(error.http_status, grpc.StatusCode.INTERNAL)


class GrpcProxy(grpc.GenericRpcHandler):
    def __init__(self, front: FrontState, channel: grpc.aio.Channel) -> None:
        self.front = front
        # Raw bytes both ways: no (de)serialisation of what is only forwarded.
        self.upstream = {PREFIX + m.name: channel.unary_unary(PREFIX + m.name) for m in SERVICE.methods
                         if PREFIX + m.name != STREAM}
        self.upstream_stream = channel.stream_stream(STREAM)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method == STREAM:
            return grpc.stream_stream_rpc_method_handler(self._stream)
        if method in self.upstream:
            return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))
        return None  # UNIMPLEMENTED

    def _forwarded(self, context: grpc.aio.ServicerContext, rid: str) -> tuple[tuple[str, Any], ...]:
        kept = tuple((m.key, m.value) for m in context.invocation_metadata() or ()
                     if not m.key.startswith((":", "grpc-")) and m.key not in DROPPED_METADATA)
        return (*kept, ("x-request-id", rid))

    def _incoming(self, context: grpc.aio.ServicerContext, key: str) -> str | None:
        for m in context.invocation_metadata() or ():
            if m.key == key and isinstance(m.value, str):
                return m.value
        return None

    def _check(self, method: str, raw: bytes, rid: str) -> tuple[str | None, bytes]:
        """(model the message names, message to forward with its id set), or FrontError."""
        if method not in MODEL_FIELDS:
            return None, raw
        model_field, id_field = MODEL_FIELDS[method]
        wanted = frozenset({model_field} | ({id_field} if id_field else set()))
        try:
            found = string_fields(raw, wanted)
        except WireError as e:
            raise FrontError(400, f"front: malformed request message ({e})", reason="malformed") from e
        model = found.get(model_field, "")
        if not (model == "" and method in EMPTY_NAME_ALLOWED) and not self.front.is_public(model):
            raise FrontError(404, f"front: unknown model '{model}'", reason="internal_model")
        if method in (INFER, STREAM):
            try:
                inputs = submessage_strings(raw, INPUTS_FIELD, INPUT_NAME_FIELD)
            except WireError as e:
                raise FrontError(400, f"front: malformed request message ({e})", reason="malformed") from e
            self.front.check_inputs(model, set(inputs))
            self.front.check_serving()
        if id_field is not None and not found.get(id_field):
            raw = with_string_field(raw, id_field, rid)
        return model, raw

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return remaining if remaining is not None else self.front.settings.request_timeout_s

    def _finish(self, rid: str, method: str, model: str | None, code: grpc.StatusCode, start: float, bytes_in: int,
                context: grpc.aio.ServicerContext, rejected: str | None) -> None:
        elapsed = time.perf_counter() - start
        metrics = self.front.metrics
        name = method.rsplit("/", 1)[-1]
        metrics.request_duration.labels("grpc", name, self.front.model_label(model), code.name).observe(elapsed)
        if rejected:
            metrics.rejected.labels("grpc", rejected).inc()
        if self.front.settings.access_log:
            log_access(request_id=rid, protocol="grpc", method="POST", path=method, model=model, status=code.name,
                       duration_s=elapsed, bytes_in=bytes_in, peer=context.peer())

    async def _unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        rid = request_id(self._incoming(context, "x-request-id"))
        start = time.perf_counter()
        code, model, rejected, held = grpc.StatusCode.OK, None, None, 0
        metrics = self.front.metrics
        metrics.in_flight.labels("grpc").inc()
        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            try:
                if method not in OPEN_METHODS and not self.front.authorized(self._incoming(context, "authorization")):
                    raise FrontError(401, "front: missing or wrong API key (authorization: Bearer ...)",
                                     reason="auth")
                model, request = self._check(method, request, rid)
                if method == INFER:
                    held = await self.front.budget.acquire(len(request))
            except BudgetExhaustedError as e:
                raise FrontError(503, str(e), reason="budget") from e
            response = await self.upstream[method](request, metadata=self._forwarded(context, rid),
                                                   timeout=self._timeout(context))
            if method in READY_METHODS and not self.front.stages_ready():
                response = READY_METHODS[method]
            return response
        except FrontError as e:
            code, rejected = grpc_code(e), e.reason
            await context.abort(code, e.message)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            await context.abort(code, e.details() or "")
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if held:
                self.front.budget.release(held)
            metrics.in_flight.labels("grpc").dec()
            self._finish(rid, method, model, code, start, len(request), context, rejected)
        raise AssertionError("unreachable: abort raises")

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        rid = request_id(self._incoming(context, "x-request-id"))
        start = time.perf_counter()
        code, models, rejected = grpc.StatusCode.OK, [], None
        held = bytes_in = 0
        metrics = self.front.metrics
        metrics.in_flight.labels("grpc").inc()
        await context.send_initial_metadata((("x-request-id", rid),))
        if not self.front.authorized(self._incoming(context, "authorization")):
            metrics.in_flight.labels("grpc").dec()
            self._finish(rid, STREAM, None, grpc.StatusCode.UNAUTHENTICATED, start, 0, context, "auth")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "front: missing or wrong API key")
        call = self.upstream_stream(metadata=self._forwarded(context, rid), timeout=self._timeout(context))
        out: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            # Each request message is checked on its own; a refused one is answered in the stream, as Triton
            # answers errors of streamed requests, and the others go on.
            nonlocal held, bytes_in, rejected
            try:
                async for index, raw in _enumerate(requests):
                    bytes_in += len(raw)
                    message_id = rid if index == 0 else f"{rid}-{index}"
                    try:
                        model, raw = self._check(STREAM, raw, message_id)
                        # Held until the stream ends: a stream's responses do not say when a request is done.
                        held += await self.front.budget.acquire(len(raw))
                    except (FrontError, BudgetExhaustedError) as e:
                        rejected = e.reason if isinstance(e, FrontError) else "budget"
                        await out.put(_stream_error(str(e), message_id))
                        continue
                    models.append(model)
                    await call.write(raw)
                await call.done_writing()
            except Exception as e:  # the client went away, or the upstream call failed
                await out.put(e)

        async def drain() -> None:
            try:
                async for response in call:
                    await out.put(response)
                await out.put(_END)
            except Exception as e:
                await out.put(e)

        tasks = [asyncio.create_task(pump()), asyncio.create_task(drain())]
        try:
            while True:
                item = await out.get()
                if item is _END:
                    break
                if isinstance(item, grpc.aio.AioRpcError):
                    code = item.code()
                    await context.abort(code, item.details() or "")
                if isinstance(item, BaseException):
                    raise item
                yield item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            for task in tasks:
                task.cancel()
            call.cancel()  # stops generation of a stream whose client went away
            self.front.budget.release(held)
            metrics.in_flight.labels("grpc").dec()
            self._finish(rid, STREAM, ",".join(dict.fromkeys(m for m in models if m)) or None, code, start,
                         bytes_in, context, rejected)


async def _enumerate(items: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    index = 0
    async for item in items:
        yield index, item
        index += 1


def _stream_error(message: str, message_id: str) -> bytes:
    response = pb.ModelStreamInferResponse(error_message=message)
    response.infer_response.id = message_id
    return response.SerializeToString()



def server_options(front: FrontState) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", front.settings.max_request_bytes),
            ("grpc.max_send_message_length", -1)]
