"""What one request to the LLM stage asks for: a generation, or one of the stream front end's control messages
(start a streamed job, poll it for text, cancel it). Parsed here into a tagged type the Triton model dispatches on."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequestError
from ..requests import GenerationRequest
from .tensors import Arrays, generation_requests

# Inputs only the stream front end sends; Triton does not pass a client's cancellation on to BLS requests, so the
# front end cancels by job id.
CONTROL_INPUTS = ("_job_id", "_poll_id", "_cancel_id")


@dataclass(frozen=True)
class Generate:
    rows: list[GenerationRequest]


@dataclass(frozen=True)
class StartStream:
    stream_id: str
    request: GenerationRequest


@dataclass(frozen=True)
class PollStream:
    stream_id: str


@dataclass(frozen=True)
class CancelStream:
    stream_id: str


LlmMessage = Generate | StartStream | PollStream | CancelStream


def _control_id(inputs: Arrays, name: str) -> str | None:
    array = inputs.get(name)
    if array is None:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_message(inputs: Arrays) -> LlmMessage:
    if (poll := _control_id(inputs, "_poll_id")) is not None:
        return PollStream(poll)
    if (cancel := _control_id(inputs, "_cancel_id")) is not None:
        return CancelStream(cancel)
    rows = generation_requests(inputs)
    if (start := _control_id(inputs, "_job_id")) is not None:
        if len(rows) != 1:
            raise InvalidRequestError(f"streaming: expected 1 row per request, got {len(rows)}")
        return StartStream(start, rows[0])
    return Generate(rows)
