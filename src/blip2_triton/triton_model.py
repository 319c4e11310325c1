"""Shared skeleton of the two stage models. It imports `triton_python_backend_utils` lazily, from the
`model.py` that Triton loads, so the rest of the package stays importable without Triton."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InvalidRequestError
from .options import ServerOptions, parameters_from_model_config
from .serving import run_grouped

log = logging.getLogger("blip2_triton")


def configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


class StageModel:
    """`execute` for a stage: parse each request, run all rows as one batch, answer each request."""

    stage_name = ""
    input_names: tuple[str, ...] = ()

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils

    def initialize(self, args: dict[str, Any]) -> None:
        configure_logging()
        config = json.loads(args["model_config"])
        self.options = ServerOptions.resolve(parameters_from_model_config(config))
        self.load(self.options)
        count, nbytes = self.parameter_stats()
        log.info("%s: model instance ready, %d parameters, %d bytes", args.get("model_name"), count, nbytes)
        family = self.pb.MetricFamily(
            name="blip2_stage_parameters",
            description="Parameters held by this stage process (logical element count)",
            kind=self.pb.MetricFamily.GAUGE,
        )
        self._metric_family = family
        family.Metric(labels={"stage": self.stage_name, "model": args.get("model_name", "")}).set(count)

    def load(self, options: ServerOptions) -> None:
        raise NotImplementedError

    def parameter_stats(self) -> tuple[int, int]:
        raise NotImplementedError

    def parse(self, inputs: dict[str, np.ndarray | None]) -> list[Any]:
        raise NotImplementedError

    def run_rows(self, rows: list[Any]) -> list[Any]:
        raise NotImplementedError

    def output_tensors(self, results: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _inputs(self, request: Any) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            out[name] = None if tensor is None else tensor.as_numpy()
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        grouped: list[list[Any] | InvalidRequestError] = []
        for request in requests:
            try:
                grouped.append(self.parse(self._inputs(request)))
            except InvalidRequestError as e:
                grouped.append(e)
        try:
            results = run_grouped(grouped, self.run_rows)
        except Exception:
            # A failure outside per-request validation (OOM, a bug) fails this batch, not the server.
            log.exception("%s: batch of %d requests failed", self.stage_name, len(requests))
            error = self.pb.TritonError(f"{self.stage_name} stage failed; see server log")
            return [self.pb.InferenceResponse(error=error) for _ in requests]
        responses = []
        for result in results:
            if isinstance(result, InvalidRequestError):
                error = self.pb.TritonError(str(result), self.pb.TritonError.INVALID_ARG)
                responses.append(self.pb.InferenceResponse(error=error))
            else:
                responses.append(self.pb.InferenceResponse(output_tensors=self.output_tensors(result)))
        return responses


class CacheMetrics:
    """The vision stage's embedding-cache counters as Triton custom metrics (served on the metrics port)."""

    def __init__(self, pb_utils: Any, model_name: str) -> None:
        labels = {"model": model_name}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        # Families must stay referenced for as long as their metrics are updated.
        self._families = {
            name: pb_utils.MetricFamily(name=f"blip2_embedding_cache_{name}", description=text, kind=kind)
            for name, text, kind in (
                ("hits_total", "Images answered from the embedding cache", counter),
                ("misses_total", "Images looked up and not found in the embedding cache", counter),
                ("evictions_total", "Embedding-cache entries evicted to stay within its byte budget", counter),
                ("bytes", "Bytes held by the embedding cache", gauge),
                ("entries", "Entries held by the embedding cache", gauge),
                ("capacity_bytes", "Byte budget of the embedding cache (0 = disabled)", gauge),
            )
        }
        self._metrics = {name: family.Metric(labels=labels) for name, family in self._families.items()}
        self._exported = {"hits_total": 0, "misses_total": 0, "evictions_total": 0}

    def export(self, stats: Any) -> None:
        # Counters only go up by increments, so send the change since the last export.
        for name, value in (("hits_total", stats.hits), ("misses_total", stats.misses),
                            ("evictions_total", stats.evictions)):
            delta = value - self._exported[name]
            if delta > 0:
                self._metrics[name].increment(delta)
                self._exported[name] = value
        self._metrics["bytes"].set(stats.bytes)
        self._metrics["entries"].set(stats.entries)
        self._metrics["capacity_bytes"].set(stats.capacity_bytes)


class VisionModel(StageModel):
    stage_name = "vision"
    input_names = ("image",)

    def load(self, options: ServerOptions) -> None:
        from .vision import VisionStage

        self.stage = VisionStage(options)

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self._cache_metrics = CacheMetrics(self.pb, args.get("model_name", ""))
        self._cache_metrics.export(self.stage.cache.stats())

    def parameter_stats(self) -> tuple[int, int]:
        return self.stage.loaded.parameter_count, self.stage.loaded.parameter_bytes

    def parse(self, inputs: dict[str, np.ndarray | None]) -> list[Any]:
        from .serving import image_requests

        return image_requests(inputs)

    def run_rows(self, rows: list[Any]) -> list[Any]:
        try:
            return self.stage.run(rows)
        finally:
            self._cache_metrics.export(self.stage.cache.stats())

    def output_tensors(self, results: list[Any]) -> list[Any]:
        return [self.pb.Tensor("_query_embeds", np.stack(results).astype(np.float32, copy=False))]


class EngineMetrics:
    """The LLM engine's figures for capacity planning, as Triton custom metrics."""

    def __init__(self, pb_utils: Any, model_name: str) -> None:
        labels = {"model": model_name}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        specs = (
            ("blip2_generated_tokens_total", "Tokens generated by the LLM stage", counter),
            ("blip2_engine_steps_total", "Forward passes (prefill or decode steps) of the LLM stage", counter),
            ("blip2_engine_step_sequences_total",
             "Sequences summed over forward passes; divided by steps it is the average executed batch size", counter),
            ("blip2_active_sequences", "Sequences decoding in the LLM stage right now", gauge),
            ("blip2_waiting_sequences", "Sequences waiting for a slot in the LLM stage's running batch", gauge),
            ("blip2_engine_queue_us_total",
             "Time sequences waited for a slot in the running batch, summed (÷ admitted = mean)", counter),
            ("blip2_engine_admitted_total", "Sequences admitted into the running batch", counter),
            ("blip2_time_to_first_token_us_total", "Submission-to-first-token time summed over requests", counter),
            ("blip2_first_tokens_total", "Requests that produced their first token", counter),
            ("blip2_requests_cancelled_total", "Generations stopped because their request was cancelled", counter),
        )
        # Families must stay referenced for as long as their metrics are updated.
        self._families = [pb_utils.MetricFamily(name=name, description=text, kind=kind) for name, text, kind in specs]
        self.m = {name: family.Metric(labels=labels) for (name, _, _), family in zip(specs, self._families,
                                                                                      strict=True)}


def _engine_observer(metrics: EngineMetrics) -> Any:
    from .engine import EngineObserver

    class Observer(EngineObserver):
        def on_step(self, active: int, new_tokens: int) -> None:
            metrics.m["blip2_engine_steps_total"].increment(1)
            metrics.m["blip2_engine_step_sequences_total"].increment(active)
            metrics.m["blip2_generated_tokens_total"].increment(new_tokens)

        def on_active(self, active: int, waiting: int) -> None:
            metrics.m["blip2_active_sequences"].set(active)
            metrics.m["blip2_waiting_sequences"].set(waiting)

        def on_admitted(self, waited_s: float) -> None:
            metrics.m["blip2_engine_queue_us_total"].increment(int(waited_s * 1e6))
            metrics.m["blip2_engine_admitted_total"].increment(1)

        def on_first_token(self, seconds: float) -> None:
            metrics.m["blip2_time_to_first_token_us_total"].increment(int(seconds * 1e6))
            metrics.m["blip2_first_tokens_total"].increment(1)

        def on_finished(self, job: Any, outcome: str) -> None:
            if outcome == "CancelledError":
                metrics.m["blip2_requests_cancelled_total"].increment(1)

    return Observer()


# Error classes sent to `blip2_generate` in the `_error_code` output: Triton 2.51 delivers every error of a
# decoupled BLS response as INTERNAL, so the class travels as data and the collector re-raises it.
ERROR_CODES = {"INVALID_ARG": 1, "CANCELLED": 2, "INTERNAL": 3}


class _Responder:
    """Collects the rows of one Triton request and answers it once all are done (or streams its one row)."""

    def __init__(self, pb: Any, sender: Any, rows: int, stream: bool, errors_as_data: bool = False) -> None:
        import threading

        self.pb, self.sender, self.stream = pb, sender, stream
        self.rows = rows
        self.errors_as_data = errors_as_data
        self.results: list[str | None] = [None] * rows
        self.remaining = rows
        self.failed = False
        self.lock = threading.Lock()

    def piece(self, text: str) -> None:
        from .serving import text_output

        self.sender.send(self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("text_output", text_output([text]))]))

    def done(self, index: int, result: str | Exception) -> None:
        from .engine import CancelledError
        from .serving import text_output

        with self.lock:
            if self.failed:
                return
            if isinstance(result, Exception):
                self.failed = True
                if isinstance(result, InvalidRequestError):
                    code, message = "INVALID_ARG", str(result)
                elif isinstance(result, CancelledError):
                    code, message = "CANCELLED", str(result)
                else:
                    log.error("generation failed: %r", result)
                    code, message = "INTERNAL", "llm stage failed; see server log"
                if self.errors_as_data:
                    response = self.pb.InferenceResponse(output_tensors=[
                        self.pb.Tensor("text_output", text_output([message] * self.rows)),
                        self.pb.Tensor("_error_code", np.full((self.rows, 1), ERROR_CODES[code], dtype=np.int32)),
                    ])
                else:
                    error = self.pb.TritonError(message, getattr(self.pb.TritonError, code))
                    response = self.pb.InferenceResponse(error=error)
            else:
                self.results[index] = result
                self.remaining -= 1
                if self.remaining:
                    return
                if self.stream:
                    self.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    return
                texts = [r or "" for r in self.results]
                response = self.pb.InferenceResponse(
                    output_tensors=[self.pb.Tensor("text_output", text_output(texts))]
                )
        self.sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class LanguageModel(StageModel):
    """The LLM stage: a decoupled model whose responses go out from the engine thread as each request finishes
    (or, streaming, as each piece of text is decoded). `execute` only queues work and returns at once, so Triton
    keeps feeding new requests into the running batch."""

    stage_name = "llm"

    def __init__(self, pb_utils: Any) -> None:
        super().__init__(pb_utils)
        from .serving import LLM_INPUTS

        self.input_names = LLM_INPUTS
        self.engine: Any = None

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        if self.options.scheduler == "inflight":
            from .engine import EngineLimits, InflightEngine

            self._metrics = EngineMetrics(self.pb, args.get("model_name", ""))
            self.engine = InflightEngine(
                self.stage,
                limits=EngineLimits(
                    max_active=self.options.max_active_sequences, max_kv_tokens=self.options.max_kv_tokens
                ),
                observer=_engine_observer(self._metrics),
            )
        log.info("%s: scheduler=%s", args.get("model_name"), self.options.scheduler)

    def load(self, options: ServerOptions) -> None:
        from .generation import LanguageStage

        self.stage = LanguageStage(options)
        self.warmup()

    def warmup(self) -> None:
        # The first forward pass pays for lazy initialisation (kernels, allocator); do it before serving.
        from .requests import GenerationRequest

        embeds = np.zeros(self.stage.embeds_shape, dtype=np.float32)
        self.stage.run([GenerationRequest(query_embeds=embeds, max_tokens=2)])

    def parameter_stats(self) -> tuple[int, int]:
        return self.stage.loaded.parameter_count, self.stage.loaded.parameter_bytes

    def parse(self, inputs: dict[str, np.ndarray | None]) -> list[Any]:
        from .serving import generation_requests

        return generation_requests(inputs)

    def _string_input(self, request: Any, name: str) -> str | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy().reshape(-1)[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    def _stream_flag(self, request: Any) -> bool:
        tensor = self.pb.get_input_tensor_by_name(request, "_stream")
        # Absent means streaming: the `blip2_stream` ensemble passes nothing; `blip2_generate` sends False.
        return True if tensor is None else bool(tensor.as_numpy().reshape(-1)[0])

    def execute(self, requests: list[Any]) -> None:  # type: ignore[override]
        from .engine import Job

        static: list[tuple[_Responder, list[Any]]] = []
        for request in requests:
            sender = request.get_response_sender()
            cancel_id = self._string_input(request, "_cancel_id")
            if cancel_id is not None:
                # Control message from a BLS front end whose client cancelled: stop that job.
                if self.engine is not None:
                    self.engine.cancel(cancel_id)
                sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            stream = self._stream_flag(request)
            job_id = self._string_input(request, "_job_id")
            # Requests from our BLS front ends get errors as data: Triton 2.51 reports every error of a decoupled
            # BLS response as INTERNAL, which would turn a bad request into a server error.
            as_data = job_id is not None or not stream
            try:
                rows = self.parse(self._inputs(request))
                if stream and len(rows) != 1:
                    raise InvalidRequestError(f"streaming: expected 1 row per request, got {len(rows)}")
            except InvalidRequestError as e:
                _Responder(self.pb, sender, 1, stream=False, errors_as_data=as_data).done(0, e)
                continue
            responder = _Responder(self.pb, sender, len(rows), stream=stream, errors_as_data=as_data)
            if job_id is not None:
                # An empty acknowledgement lets the BLS caller's exec() return now rather than at the first text.
                sender.send(self.pb.InferenceResponse(output_tensors=[]))
            if self.engine is None:
                static.append((responder, rows))
                continue
            self.engine.submit([
                Job(
                    request=row,
                    on_piece=responder.piece if stream else None,
                    on_done=lambda result, i=i, r=responder: r.done(i, result),
                    is_cancelled=request.is_cancelled,
                    job_id=f"{job_id}/{i}" if job_id is not None else None,
                )
                for i, row in enumerate(rows)
            ])
        if static:
            self._run_static(static)
        return None

    def _run_static(self, batch: list[tuple[_Responder, list[Any]]]) -> None:
        # Plain dynamic batching: the whole Triton batch is generated before any of it is answered.
        rows = [row for _, rs in batch for row in rs]
        try:
            results = self.stage.run(rows)
        except Exception as e:
            log.exception("llm: batch of %d rows failed", len(rows))
            results = [e] * len(rows)
        pos = 0
        for responder, rs in batch:
            for i in range(len(rs)):
                result = results[pos]
                pos += 1
                if responder.stream and isinstance(result, str):
                    responder.piece(result)
                responder.done(i, result)

    def finalize(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def _bls_start(pb: Any, target: str, inputs: list[Any], *, job_id: str, stream: bool) -> Any:
    """Sends one request to the decoupled LLM stage through BLS; returns its response iterator. The stage
    acknowledges BLS jobs at once (an empty response), so this returns before generation ends."""
    rows = inputs[0].as_numpy().shape[0]
    bls = pb.InferenceRequest(
        model_name=target,
        requested_output_names=["text_output", "_error_code"],
        inputs=[
            *inputs,
            pb.Tensor("_stream", np.full((rows, 1), stream, dtype=np.bool_)),
            pb.Tensor("_job_id", np.full((rows, 1), job_id.encode(), dtype=np.object_)),
        ],
    )
    return bls.exec(decoupled=True)


def _bls_collect(pb: Any, target: str, responses: Any, *, stream: bool,
                 on_piece: Callable[[Any], bool] | None = None) -> Any:
    """Reads an LLM-stage response stream. Streams text pieces (output tensors) to `on_piece`, which returns
    False to stop early; returns the final InferenceResponse to send (text, or the error with its class)."""
    codes = {v: k for k, v in ERROR_CODES.items()}
    final = None
    for response in responses:
        if response.has_error():
            log.error("%s failed: %s", target, response.error().message())
            return pb.InferenceResponse(error=pb.TritonError("generation failed; see server log"))
        tensor = pb.get_output_tensor_by_name(response, "text_output")
        if tensor is None:
            continue
        code = pb.get_output_tensor_by_name(response, "_error_code")
        if code is not None:
            name = codes.get(int(code.as_numpy().reshape(-1)[0]), "INTERNAL")
            message = tensor.as_numpy().reshape(-1)[0].decode("utf-8", "replace")
            return pb.InferenceResponse(error=pb.TritonError(message, getattr(pb.TritonError, name)))
        if stream and on_piece is not None:
            if not on_piece(tensor):
                return None
        else:
            final = pb.InferenceResponse(output_tensors=[pb.Tensor("text_output", tensor.as_numpy())])
    if stream:
        return None
    return final or pb.InferenceResponse(error=pb.TritonError("llm stage returned no text"))


class _FrontEnd:
    """Common part of the weightless models in front of the LLM stage. Single-threaded on purpose: the Python
    backend's stub is not safe for BLS calls and response senders driven from worker threads (stubs crashed
    under load that way), so concurrency comes from several instances and from the LLM stage's engine."""

    stage_name = "frontend"

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils

    def initialize(self, args: dict[str, Any]) -> None:
        import uuid

        from .serving import LLM_INPUTS

        configure_logging()
        config = json.loads(args["model_config"])
        self.params = parameters_from_model_config(config)
        self.target = self.params.get("llm_model") or "blip2_llm"
        self.input_names = LLM_INPUTS
        self._uuid = uuid.uuid4

    def _inputs(self, request: Any, names: tuple[str, ...]) -> list[Any]:
        tensors = (self.pb.get_input_tensor_by_name(request, n) for n in names)
        return [t for t in tensors if t is not None]

    def _failed(self, stage: str) -> Any:
        log.exception("%s: request failed", stage)
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"{stage} failed; see server log"))


class CollectorModel(_FrontEnd):
    """`blip2_generate`: the non-decoupled LLM step of the `blip2` ensemble. Sends every request of its batch to
    the decoupled LLM stage first (they join the engine's running batch), then collects the texts."""

    stage_name = "generate"

    def execute(self, requests: list[Any]) -> list[Any]:
        started: list[Any] = []
        for request in requests:
            try:
                started.append(_bls_start(self.pb, self.target, self._inputs(request, self.input_names),
                                          job_id=str(self._uuid()), stream=False))
            except Exception:
                started.append(self._failed(self.stage_name))
        responses = []
        for item in started:
            if isinstance(item, self.pb.InferenceResponse):
                responses.append(item)
                continue
            try:
                responses.append(_bls_collect(self.pb, self.target, item, stream=False))
            except Exception:
                responses.append(self._failed(self.stage_name))
        return responses


class StreamModel(_FrontEnd):
    """`blip2_stream`: decoupled entry point for token streaming. Runs the vision stage and then the LLM stage
    through BLS, forwarding each text piece as it is decoded. Being a top-level request (not an ensemble step)
    it sees the client's cancellation, and passes it on to the LLM stage, which stops that sequence."""

    stage_name = "stream"

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self.vision = self.params.get("vision_model") or "blip2_vision"

    def execute(self, requests: list[Any]) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                final = self._stream_one(request, sender)
            except Exception:
                final = self._failed(self.stage_name)
            if final is None:
                sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _cancel(self, job_id: str) -> None:
        control = self.pb.InferenceRequest(
            model_name=self.target, requested_output_names=["text_output"],
            inputs=[self.pb.Tensor("_cancel_id", np.array([[f"{job_id}/0".encode()]], dtype=np.object_))],
        )
        for _ in control.exec(decoupled=True):
            pass

    def _stream_one(self, request: Any, sender: Any) -> Any:
        import time

        pb = self.pb
        image = self._inputs(request, ("image",))
        if not image:
            return pb.InferenceResponse(error=pb.TritonError("image: required input is missing",
                                                             pb.TritonError.INVALID_ARG))
        vision = pb.InferenceRequest(model_name=self.vision, requested_output_names=["_query_embeds"],
                                     inputs=image).exec()
        if vision.has_error():
            return pb.InferenceResponse(error=pb.TritonError(vision.error().message(), vision.error().code()))
        embeds = pb.get_output_tensor_by_name(vision, "_query_embeds")
        job_id = str(self._uuid())
        responses = _bls_start(pb, self.target, [embeds, *self._inputs(request, self.input_names[1:])],
                               job_id=job_id, stream=True)
        checked = [time.monotonic()]

        def piece(tensor: Any) -> bool:
            now = time.monotonic()
            # Asking Triton is an IPC round trip; once every 50 ms is enough to stop within a few steps.
            if now - checked[0] >= 0.05:
                checked[0] = now
                if request.is_cancelled():
                    self._cancel(job_id)
                    for _ in responses:  # drain: the stage ends the cancelled job's stream itself
                        pass
                    return False
            sender.send(pb.InferenceResponse(output_tensors=[pb.Tensor("text_output", tensor.as_numpy())]))
            return True

        return _bls_collect(pb, self.target, responses, stream=True, on_piece=piece)


def python_model(cls: Callable[[Any], Any]) -> type:
    """Builds the `TritonPythonModel` class Triton's Python backend looks for."""
    import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]

    class TritonPythonModel:
        def initialize(self, args: dict[str, Any]) -> None:
            self.impl = cls(pb_utils)
            self.impl.initialize(args)

        def execute(self, requests: list[Any]) -> list[Any]:
            return self.impl.execute(requests)

        def finalize(self) -> None:
            log.info("%s stage unloading", self.impl.stage_name)
            finalize = getattr(self.impl, "finalize", None)
            if finalize is not None:
                finalize()

    return TritonPythonModel
