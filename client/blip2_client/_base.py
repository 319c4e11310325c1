from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._errors import Blip2Error, DeadlineExceededError, StreamingUnsupportedError, map_error
from ._request import DEFAULT_GRPC_URL, Protocol, parse_url
from ._retrieval import RetrievalModels

NOT_FOUND_STATUS = {"404", "StatusCode.NOT_FOUND"}
# Exponential backoff stops growing here: with many retries an uncapped doubling would sleep for days.
MAX_BACKOFF_S = 30.0


class _ClientConfig:
    """Settings and checks shared by the sync and async clients."""

    def __init__(
        self,
        url: str = DEFAULT_GRPC_URL,
        *,
        protocol: Protocol | None = None,
        timeout_s: float = 60.0,
        model_name: str = "blip2",
        stream_model_name: str = "blip2_stream",
        retries: int = 0,
        retry_backoff_s: float = 0.5,
        max_concurrency: int = 8,
        retrieval_models: RetrievalModels | None = None,
    ) -> None:
        self._hostport, self._protocol, self._ssl = parse_url(url, protocol)
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (math.isfinite(retry_backoff_s) and retry_backoff_s >= 0):
            raise ValueError(f"retry_backoff_s must be finite and >= 0, got {retry_backoff_s!r}")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.model_name = model_name
        self.stream_model_name = stream_model_name
        self.retries = retries
        self.retry_backoff_s = float(retry_backoff_s)
        self.max_concurrency = max_concurrency
        self.retrieval_models = retrieval_models or RetrievalModels()
        self._init_state()

    def _init_state(self) -> None:
        pass

    @property
    def protocol(self) -> Protocol:
        return self._protocol

    def _retrieval_model(self, entry: str) -> str:
        name: str = getattr(self.retrieval_models, entry)
        return name

    def _backoff_s(self, attempt: int) -> float:
        return min(float(self.retry_backoff_s * 2 ** min(attempt, 32)), MAX_BACKOFF_S)

    @staticmethod
    def _check_wait_args(timeout_s: float, poll_interval_s: float) -> None:
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s >= 0):
            raise ValueError(f"timeout_s must be a finite number >= 0, got {timeout_s!r}")
        if not (isinstance(poll_interval_s, (int, float)) and math.isfinite(poll_interval_s) and poll_interval_s > 0):
            raise ValueError(f"poll_interval_s must be a finite number > 0, got {poll_interval_s!r}")

    def _mapped(self, exc: Exception, timeout_s: float) -> Blip2Error:
        err = map_error(exc)
        if isinstance(err, DeadlineExceededError) and "timeout_s=" not in err.message:
            err = DeadlineExceededError(f"no response within timeout_s={timeout_s:g}: {err.message}", status=err.status)
        return err

    def _is_stream_model_missing(self, exc: Blip2Error) -> bool:
        # A model that exists with no version ready (loading, or unloading while the server drains) is
        # unavailable for now, not missing: "has no available versions", "is not at ready state".
        message = exc.message.lower()
        if "no available versions" in message or "not at ready state" in message:
            return False
        return exc.status in NOT_FOUND_STATUS or "unknown model" in message

    def _stream_missing_error(self) -> StreamingUnsupportedError:
        return StreamingUnsupportedError(
            f"the server does not serve the streaming model {self.stream_model_name!r}; use generate() instead"
        )

    def _check_stream_protocol(self) -> None:
        if self._protocol != "grpc":
            raise StreamingUnsupportedError("token streaming needs protocol='grpc'")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.url!r}, protocol={self._protocol!r}, "
            f"timeout_s={self.timeout_s:g}, model_name={self.model_name!r})"
        )


Op = Callable[[Any, dict[str, Any]], Any]
