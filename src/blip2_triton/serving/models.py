"""The Python-backend models: parse each request, hand it to its stage, answer. Triton's `pb_utils` is handed in by
the `model.py` shim Triton loads (`python_model`), so this module stays importable without Triton."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..logs import configure_logging
from ..options import ServerOptions, parameters_from_model_config
from .control import CONTROL_INPUTS, CancelStream, Generate, LlmMessage, PollStream, StartStream, parse_message
from .tensors import LLM_INPUTS, completion_outputs, image_requests

log = logging.getLogger("blip2_triton")


class StageModel:
    """What the computing stages share: options from the model config, torch threads, loading, the size metric, and
    a request's response from its rows' results (`outputs`; the image and retrieval stages also `parse` it)."""

    stage_name = ""
    input_names: tuple[str, ...] = ()

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils

    def initialize(self, args: dict[str, Any]) -> None:
        from .metrics import MetricSet

        config = json.loads(args["model_config"])
        self.options = ServerOptions.resolve(parameters_from_model_config(config)).on_instance(
            str(args.get("model_instance_kind", "CPU")), args.get("model_instance_device_id", 0))
        configure_logging(self.options.log_format)
        self._set_threads(args.get("model_name", ""))
        self.load(self.options)
        count, nbytes = self.stage.loaded.parameter_count, self.stage.loaded.parameter_bytes
        log.info("%s: model instance ready in pid %d, %d parameters, %d bytes", args.get("model_name"), os.getpid(),
                 count, nbytes)
        self.metrics = MetricSet(self.pb, {"model": args.get("model_name", "")})
        parameters = MetricSet(self.pb, {"stage": self.stage_name, "model": args.get("model_name", "")})
        parameters.add("blip2_stage_parameters", "Parameters held by this stage process (logical element count)",
                       "GAUGE")
        parameters.set("blip2_stage_parameters", count)
        self.metric_sets = [self.metrics, parameters]

    def _set_threads(self, model_name: str) -> None:
        # Before loading: packing weights and the warm-up already run on the pool they will serve with.
        import torch

        from ..checkpoint import resolve_device
        from ..compute_lock import available_cores, oversubscription, stage_threads

        device = str(resolve_device(self.options.device))
        cores = available_cores()
        threads = stage_threads(self.options, device, cores=cores, torch_default=torch.get_num_threads())
        if threads is not None:
            torch.set_num_threads(threads)
        log.info("%s: %d torch threads (compute_lock=%s, cpu_threads=%s, cpu_stages=%d, OMP_NUM_THREADS=%s)",
                 model_name, torch.get_num_threads(), self.options.compute_lock, self.options.cpu_threads or "auto",
                 self.options.cpu_stages, os.environ.get("OMP_NUM_THREADS", "unset"))
        problem = oversubscription(self.options, device, torch.get_num_threads(), cores=cores)
        if problem is not None:
            log.warning("%s: %s", model_name, problem)

    def load(self, options: ServerOptions) -> None:
        raise NotImplementedError

    def parse(self, request: Any) -> tuple[list[Any], Any]:
        """The request's rows for the stage, and what `outputs` needs to know of the request."""
        raise NotImplementedError

    def outputs(self, results: list[Any], context: Any) -> dict[str, np.ndarray]:
        """The request's output tensors; an InvalidRequestError fails that request alone."""
        raise NotImplementedError

    def _response(self, results: list[Any], context: Any, request_id: str = "") -> Any:
        try:
            error = next((r for r in results if isinstance(r, Exception)), None)
            if error is not None:
                raise error
            tensors = [self.pb.Tensor(name, array) for name, array in self.outputs(results, context).items()]
        except Exception as e:
            return self.pb.InferenceResponse(error=_triton_error(self.pb, e, self.stage_name, request_id))
        return self.pb.InferenceResponse(output_tensors=tensors)

    def _inputs(self, request: Any) -> dict[str, np.ndarray | None]:
        out: dict[str, np.ndarray | None] = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            out[name] = None if tensor is None else tensor.as_numpy()
        return out


# A cache's metric family prefix and the words its descriptions use (serving.metrics.CacheMetrics).
CacheMetricsSpec = tuple[str, str]
EMBEDDING_CACHE_METRICS: CacheMetricsSpec = ("blip2_embedding_cache", "embedding cache")
FEATURES_CACHE_METRICS: CacheMetricsSpec = ("blip2_vision_features_cache", "ViT-feature cache")


class _PipelineModel(StageModel):
    """An image stage answering each request from its pipeline's threads when its images are embedded: `execute`
    only hands requests over, so one slow image never holds up the requests behind it."""

    input_names = ("image",)

    def caches(self) -> list[tuple[CacheMetricsSpec, Any]]:
        """(metric family prefix and description, cache) of each cache the stage keeps."""
        raise NotImplementedError

    def initialize(self, args: dict[str, Any]) -> None:
        from ..compute_lock import available_cores
        from ..vision.pipeline import VisionPipeline
        from .metrics import CacheMetrics

        super().initialize(args)
        self._cache_metrics = [(CacheMetrics(self.metrics, prefix=prefix, what=what), cache)
                               for (prefix, what), cache in self.caches()]
        self._export_cache_metrics()
        config = json.loads(args["model_config"])
        max_batch = int(config.get("max_batch_size") or 16)
        self.warm_up(max_batch)
        threads = self.options.decode_threads or min(8, max(2, available_cores()))
        self.pipeline = VisionPipeline(self.stage, decode_threads=threads, max_batch=max_batch,
                                       on_batch=self._export_cache_metrics)

    def warm_up(self, max_batch: int) -> None:
        """Before serving, with the batch size Triton may send."""

    def _export_cache_metrics(self) -> None:
        for metrics, cache in self._cache_metrics:
            metrics.export(cache.stats())

    def execute(self, requests: list[Any]) -> None:  # type: ignore[override]
        for request in requests:
            sender = request.get_response_sender()
            rid = request.request_id()
            try:
                rows, context = self.parse(request)
            except InvalidRequestError as e:
                self._answer(sender, [e], None, rid)
                continue
            self.pipeline.submit(rows, lambda results, sender=sender, context=context, rid=rid:
                                 self._answer(sender, results, context, rid))
        # Cache hits are answered without a compute batch: their counters go out here.
        self._export_cache_metrics()

    def _answer(self, sender: Any, results: list[Any], context: Any, request_id: str = "") -> None:
        sender.send(self._response(results, context, request_id), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.pipeline.stop()


class VisionModel(_PipelineModel):
    """The captioning vision stage: image bytes -> `_query_embeds` for the LLM stage."""

    stage_name = "vision"

    def load(self, options: ServerOptions) -> None:
        from ..vision import VisionStage

        self.stage = VisionStage(options)

    def warm_up(self, max_batch: int) -> None:
        from .metrics import CUDA_GRAPH_BYTES

        self.stage.warm_up(max_batch)
        self.metrics.add(*CUDA_GRAPH_BYTES)
        self.metrics.set(CUDA_GRAPH_BYTES[0], self.stage.graph_bytes)

    def caches(self) -> list[tuple[CacheMetricsSpec, Any]]:
        return [(EMBEDDING_CACHE_METRICS, self.stage.cache)]

    def parse(self, request: Any) -> tuple[list[Any], Any]:
        return image_requests(self._inputs(request)), None

    def outputs(self, results: list[Any], context: Any) -> dict[str, np.ndarray]:
        return {"_query_embeds": np.stack(results).astype(np.float32, copy=False)}


class RetrievalVisionModel(_PipelineModel):
    """The retrieval image stage: image bytes -> `_image_embeds` and/or `_vision_features`, only those the caller
    requests (an ensemble step requests the outputs it maps)."""

    stage_name = "itm_vision"

    def load(self, options: ServerOptions) -> None:
        from ..retrieval import RetrievalImageStage

        self.stage = RetrievalImageStage(options)

    def caches(self) -> list[tuple[CacheMetricsSpec, Any]]:
        return [(EMBEDDING_CACHE_METRICS, self.stage.cache), (FEATURES_CACHE_METRICS, self.stage.features_cache)]

    def parse(self, request: Any) -> tuple[list[Any], Any]:
        from .. import retrieval_serving

        requested = set(request.requested_output_names())
        return retrieval_serving.image_requests(self._inputs(request), requested), requested

    def outputs(self, results: list[Any], context: Any) -> dict[str, np.ndarray]:
        from .. import retrieval_serving

        return retrieval_serving.image_outputs(results, context)


class _BatchModel(StageModel):
    """A stage that answers each Triton batch within `execute`: every request's rows run in one `stage.run`, and
    a request with a bad row (or that fails to parse) fails alone."""

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed: list[tuple[list[Any], Any] | Exception] = []
        for request in requests:
            try:
                parsed.append(self.parse(request))
            except InvalidRequestError as e:
                parsed.append(e)
        rows = [row for p in parsed if not isinstance(p, Exception) for row in p[0]]
        try:
            results: list[Any] = list(self.stage.run(rows)) if rows else []
        except Exception as e:
            log.exception("%s batch of %d rows failed", self.stage_name, len(rows))
            results = [e] * len(rows)
        return [self._response(mine, context) for mine, context in self._slices(parsed, results)]

    @staticmethod
    def _slices(parsed: list[tuple[list[Any], Any] | Exception], results: list[Any]) -> list[tuple[list[Any], Any]]:
        # Each request's own results (or its parse error), in request order.
        out: list[tuple[list[Any], Any]] = []
        start = 0
        for p in parsed:
            if isinstance(p, Exception):
                out.append(([p], None))
            else:
                out.append((results[start:start + len(p[0])], p[1]))
                start += len(p[0])
        return out


class RetrievalTextModel(_BatchModel):
    """text -> `_text_embeds` (normalised); with `_image_embeds` as well, the pair's `similarity`. Only the outputs
    the caller requests are sent."""

    stage_name = "itm_text"
    input_names = ("text_input", "_image_embeds")

    def load(self, options: ServerOptions) -> None:
        from ..retrieval import RetrievalTextStage, SimilarityStage

        self.stage = RetrievalTextStage(options)
        self.similarity = SimilarityStage(self.stage.config)

    def parse(self, request: Any) -> tuple[list[Any], Any]:
        from .. import retrieval_serving

        inputs = self._inputs(request)
        requested = set(request.requested_output_names())
        rows = retrieval_serving.text_requests(inputs)
        return rows, (requested, retrieval_serving.text_image_embeds(inputs, len(rows), requested))

    def outputs(self, results: list[Any], context: Any) -> dict[str, np.ndarray]:
        from .. import retrieval_serving

        requested, image_embeds = context
        return retrieval_serving.text_outputs(results, requested, image_embeds, self.similarity)


class RetrievalMatchModel(_BatchModel):
    """(`_vision_features`, text) -> `match_probability`."""

    stage_name = "itm_match"
    input_names = ("_vision_features", "text_input")

    def load(self, options: ServerOptions) -> None:
        from ..retrieval import RetrievalMatchStage

        self.stage = RetrievalMatchStage(options)

    def parse(self, request: Any) -> tuple[list[Any], Any]:
        from .. import retrieval_serving

        return retrieval_serving.match_requests(self._inputs(request)), None

    def outputs(self, results: list[Any], context: Any) -> dict[str, np.ndarray]:
        from .. import retrieval_serving

        return {"match_probability": retrieval_serving.score_output(results)}


class _Responder:
    """Collects the rows of one Triton request and answers it once, when all rows are done (or one failed)."""

    def __init__(self, model: StageModel, sender: Any, rows: int, request_id: str) -> None:
        import threading

        self.model, self.sender, self.request_id = model, sender, request_id
        self.results: list[Any] = [None] * rows
        self.remaining = rows
        self.answered = False
        self.lock = threading.Lock()

    def done(self, index: int, result: Any) -> None:
        with self.lock:
            if self.answered:
                return
            self.results[index] = result
            self.remaining -= 1
            if self.remaining and not isinstance(result, Exception):
                return
            self.answered = True
        # The first failed row (this one, if any) fails the request.
        self.sender.send(self.model._response(self.results, None, self.request_id),
                         flags=self.model.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _triton_error(pb: Any, error: Exception, stage: str, request_id: str = "") -> Any:
    """The error a client sees: request errors with their message, anything else without details."""
    from ..llm.engine import CancelledError

    if isinstance(error, InvalidRequestError):
        return pb.TritonError(str(error), pb.TritonError.INVALID_ARG)
    if isinstance(error, CancelledError):
        return pb.TritonError(str(error), pb.TritonError.CANCELLED)
    log.error("request %s: %s stage failed: %r", request_id or "-", stage, error,
              extra={"request_id": request_id or None})
    return pb.TritonError(f"{stage} stage failed; see server log")


class LanguageModel(StageModel):
    """The LLM stage: a plain (non-decoupled) model whose engine thread answers each request through its response
    sender when it finishes. `execute` only hands work over, so requests keep joining the running batch while the
    `blip2` ensemble calls this model with ordinary infer. Stream control messages: `control.py`."""

    stage_name = "llm"
    input_names = (*LLM_INPUTS, *CONTROL_INPUTS)

    def initialize(self, args: dict[str, Any]) -> None:
        from ..llm import EngineLimits, InflightEngine
        from .metrics import EngineMetrics
        from .streams import StreamHub

        super().initialize(args)
        self.streams = StreamHub()
        limits = EngineLimits(max_active=self.options.max_active_sequences, max_kv_tokens=self.options.max_kv_tokens,
                              policy=self.options.scheduler)
        self.engine = InflightEngine(self.stage, limits=limits, observer=EngineMetrics(self.metrics),
                                     on_iteration=self.streams.expire_polls)
        # Every bucket's graph before the first request: a capture at first use would stall that iteration.
        self.engine.capture_graphs()
        log.info("%s: scheduler=%s", args.get("model_name"), self.options.scheduler)

    def load(self, options: ServerOptions) -> None:
        from ..llm import LanguageStage
        from ..requests import GenerationRequest

        self.stage = LanguageStage(options)
        # The first forward pass pays for lazy initialisation (kernels, allocator): done before serving.
        self.stage.run([GenerationRequest(query_embeds=np.zeros(self.stage.embeds_shape, dtype=np.float32),
                                          max_tokens=2)])

    def _send(self, sender: Any, text: str = "", end: object | None = None, *, request_id: str = "") -> None:
        """A stream control reply: text since the last one, and once the stream has ended its completion or error."""
        from ..llm import Completion

        if isinstance(end, Exception):
            response = self.pb.InferenceResponse(error=_triton_error(self.pb, end, self.stage_name, request_id))
        else:
            # Every reply carries every output (the counts are final once `_done`), as a BLS caller asks for all.
            completion = replace(end, text=text) if isinstance(end, Completion) else Completion(text, 0, "")
            outputs = completion_outputs([completion])
            outputs["_done"] = np.array([[end is not None]], dtype=np.bool_)
            response = self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in outputs.items()])
        sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list[Any]) -> None:  # type: ignore[override]
        for request in requests:
            sender = request.get_response_sender()
            request_id = request.request_id()
            try:
                self._dispatch(parse_message(self._inputs(request)), request, sender, request_id)
            except Exception as e:
                if not isinstance(e, InvalidRequestError):
                    log.exception("request %s: llm stage failed", request_id or "-",
                                  extra={"request_id": request_id or None})
                self._send(sender, end=e, request_id=request_id)

    def _dispatch(self, message: LlmMessage, request: Any, sender: Any, request_id: str) -> None:
        from ..llm import CancelledError, Completion, Job

        match message:
            case PollStream(stream_id):
                self.streams.poll(stream_id, lambda text, end: self._send(sender, text, end, request_id=request_id))
            case CancelStream(stream_id):
                self.engine.cancel(stream_id)
                self.streams.discard(stream_id, CancelledError("request cancelled"))
                self._send(sender, end=Completion("", 0, "cancelled"))
            case StartStream(stream_id, row):
                self.streams.open(stream_id)
                # Acknowledged at once: the front end's BLS call returns and it starts polling.
                self._send(sender)
                self.engine.submit([Job(request=row, on_piece=lambda piece: self.streams.piece(stream_id, piece),
                                        on_done=lambda result: self.streams.finish(stream_id, result),
                                        job_id=stream_id, request_id=request_id)])
            case Generate(rows):
                responder = _Responder(self, sender, len(rows), request_id)
                # Once a sibling row has failed the request is answered: the other rows stop at the next iteration.
                self.engine.submit([
                    Job(request=row, on_piece=None, on_done=lambda result, i=i: responder.done(i, result),
                        is_cancelled=request.is_cancelled, is_abandoned=lambda: responder.answered,
                        request_id=request_id)
                    for i, row in enumerate(rows)
                ])

    def outputs(self, results: list[Any], context: Any) -> dict[str, np.ndarray]:
        return completion_outputs(results)

    def finalize(self) -> None:
        self.engine.stop()


STREAM_OUTPUTS = ("text_output", "num_output_tokens", "finish_reason", "num_input_tokens")


class StreamModel:
    """`blip2_stream`: decoupled entry point for token streaming. Runs the vision stage, starts the job in the
    LLM stage and long-polls it for text (why: `streams.py`), forwarding each piece as it arrives. Being a top-level
    request (not an ensemble step) it sees the client's cancellation, and passes it on to the LLM stage, which stops
    that sequence. Single-threaded on purpose (the stub is not safe for BLS calls driven from worker threads);
    concurrent streams come from several instances."""

    stage_name = "stream"

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils

    def initialize(self, args: dict[str, Any]) -> None:
        import uuid

        params = parameters_from_model_config(json.loads(args["model_config"]))
        configure_logging(ServerOptions.resolve(params).log_format)
        self.vision = params.get("vision_model") or "blip2_vision"
        self.target = params.get("llm_model") or "blip2_llm"
        self.input_names = LLM_INPUTS
        self._uuid = uuid.uuid4
        log.info("%s: model instance ready in pid %d", args.get("model_instance_name"), os.getpid())

    def _inputs(self, request: Any, names: tuple[str, ...]) -> list[Any]:
        tensors = (self.pb.get_input_tensor_by_name(request, n) for n in names)
        return [t for t in tensors if t is not None]

    def execute(self, requests: list[Any]) -> None:
        pb = self.pb
        for request in requests:
            sender = request.get_response_sender()
            try:
                final = self._stream_one(request, sender)
            except Exception:
                log.exception("stream: request failed")
                final = pb.InferenceResponse(error=pb.TritonError("stream failed; see server log"))
            if final is None:
                sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            else:
                sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _llm(self, request_id: str, *tensors: Any) -> Any:
        # The client's id goes along, so the LLM stage's log lines about this stream carry it.
        return self.pb.InferenceRequest(model_name=self.target, requested_output_names=[*STREAM_OUTPUTS, "_done"],
                                        inputs=list(tensors), request_id=request_id).exec()

    def _control(self, name: str, job_id: str) -> Any:
        return self.pb.Tensor(name, np.array([[job_id.encode()]], dtype=np.object_))

    def _error(self, response: Any) -> Any:
        error = response.error()
        return self.pb.InferenceResponse(error=self.pb.TritonError(error.message(), error.code()))

    def _stream_one(self, request: Any, sender: Any) -> Any:
        pb = self.pb
        image = self._inputs(request, ("image",))
        if not image:
            return pb.InferenceResponse(error=pb.TritonError("image: required input is missing",
                                                             pb.TritonError.INVALID_ARG))
        rid = request.request_id()
        vision = pb.InferenceRequest(model_name=self.vision, requested_output_names=["_query_embeds"],
                                     inputs=image, request_id=rid).exec()
        if vision.has_error():
            return self._error(vision)
        embeds = pb.get_output_tensor_by_name(vision, "_query_embeds")
        job_id = str(self._uuid())
        started = self._llm(rid, embeds, *self._inputs(request, self.input_names[1:]),
                            self._control("_job_id", job_id))
        if started.has_error():
            return self._error(started)
        while True:
            if request.is_cancelled():
                self._llm(rid, self._control("_cancel_id", job_id))
                return None
            reply = self._llm(rid, self._control("_poll_id", job_id))
            if reply.has_error():
                return self._error(reply)
            if bool(pb.get_output_tensor_by_name(reply, "_done").as_numpy().reshape(-1)[0]):
                # The last piece carries the token count and finish reason.
                return pb.InferenceResponse(output_tensors=[
                    pb.Tensor(name, pb.get_output_tensor_by_name(reply, name).as_numpy()) for name in STREAM_OUTPUTS])
            text = pb.get_output_tensor_by_name(reply, "text_output").as_numpy()
            if text.reshape(-1)[0]:
                sender.send(pb.InferenceResponse(output_tensors=[pb.Tensor("text_output", text)]))


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
            import gc

            log.info("%s stage unloading", self.impl.stage_name)
            if hasattr(self.impl, "finalize"):
                self.impl.finalize()  # no bound method kept in a local: it would keep the model alive below
            # Custom metrics must die now, even where a thread still holds the model: destroyed later, at
            # interpreter exit, they write to the stub's shared memory after it is gone and the stub segfaults.
            for metrics in getattr(self.impl, "metric_sets", ()):
                metrics.close()
            del self.impl
            gc.collect()

    return TritonPythonModel
