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


class VisionModel(StageModel):
    stage_name = "vision"
    input_names = ("image",)

    def load(self, options: ServerOptions) -> None:
        from .vision import VisionStage

        self.stage = VisionStage(options)

    def parameter_stats(self) -> tuple[int, int]:
        return self.stage.loaded.parameter_count, self.stage.loaded.parameter_bytes

    def parse(self, inputs: dict[str, np.ndarray | None]) -> list[Any]:
        from .serving import image_requests

        return image_requests(inputs)

    def run_rows(self, rows: list[Any]) -> list[Any]:
        return self.stage.run(rows)

    def output_tensors(self, results: list[Any]) -> list[Any]:
        return [self.pb.Tensor("_query_embeds", np.stack(results).astype(np.float32, copy=False))]


class LanguageModel(StageModel):
    stage_name = "llm"

    def __init__(self, pb_utils: Any) -> None:
        super().__init__(pb_utils)
        from .serving import LLM_INPUTS

        self.input_names = LLM_INPUTS

    def load(self, options: ServerOptions) -> None:
        from .generation import LanguageStage

        self.stage = LanguageStage(options)

    def parameter_stats(self) -> tuple[int, int]:
        return self.stage.loaded.parameter_count, self.stage.loaded.parameter_bytes

    def parse(self, inputs: dict[str, np.ndarray | None]) -> list[Any]:
        from .serving import generation_requests

        return generation_requests(inputs)

    def run_rows(self, rows: list[Any]) -> list[Any]:
        return self.stage.run(rows)

    def output_tensors(self, results: list[Any]) -> list[Any]:
        from .serving import text_output

        return [self.pb.Tensor("text_output", text_output(results))]


def python_model(cls: Callable[[Any], StageModel]) -> type:
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

    return TritonPythonModel
