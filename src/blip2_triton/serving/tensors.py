"""Numpy tensors of one Triton request -> stage requests, and stage results -> output arrays (no Triton import)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InvalidRequestError
from ..requests import GenerationRequest, ImageRequest

CONTROL_DTYPES: dict[str, tuple[type, np.dtype]] = {
    "max_tokens": (int, np.dtype(np.int32)),
    "temperature": (float, np.dtype(np.float32)),
    "top_p": (float, np.dtype(np.float32)),
    "top_k": (int, np.dtype(np.int32)),
    "beam_width": (int, np.dtype(np.int32)),
    "repetition_penalty": (float, np.dtype(np.float32)),
    "seed": (int, np.dtype(np.uint64)),
}
LLM_INPUTS = ("_query_embeds", "text_input", *CONTROL_DTYPES)

Arrays = Mapping[str, np.ndarray | None]


def _rows(name: str, array: np.ndarray, n: int | None) -> list[Any]:
    # Each public input has per-request dims [1]; with the batch dim a request holds n rows of shape [1].
    if array.ndim != 2 or array.shape[1] != 1:
        raise InvalidRequestError(f"{name}: expected shape [batch, 1], got {list(array.shape)}")
    if n is not None and array.shape[0] != n:
        raise InvalidRequestError(f"{name}: expected {n} rows like the other inputs, got {array.shape[0]}")
    return [array[i, 0] for i in range(array.shape[0])]


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.bytes_ | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise InvalidRequestError(f"expected bytes, got {type(value).__name__}")


def image_requests(inputs: Arrays) -> list[ImageRequest]:
    image = inputs.get("image")
    if image is None:
        raise InvalidRequestError("image: required input is missing")
    return [ImageRequest(_as_bytes(v)) for v in _rows("image", image, None)]


def decode_prompt(raw: Any) -> str | None:
    try:
        text = _as_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"text_input: expected UTF-8 text, got invalid byte at offset {e.start}") from e
    # Whitespace-only prompts caption like an absent one; a prompt is never silently altered otherwise.
    return text if text.strip() else None


def generation_requests(inputs: Arrays) -> list[GenerationRequest]:
    embeds = inputs.get("_query_embeds")
    if embeds is None:
        raise InvalidRequestError("_query_embeds: required input is missing")
    if embeds.ndim != 3:
        raise InvalidRequestError(f"_query_embeds: expected shape [batch, tokens, width], got {list(embeds.shape)}")
    n = embeds.shape[0]
    prompts: list[str | None] = [None] * n
    text = inputs.get("text_input")
    if text is not None:
        prompts = [decode_prompt(v) for v in _rows("text_input", text, n)]
    controls: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, (cast, dtype) in CONTROL_DTYPES.items():
        array = inputs.get(name)
        if array is None:
            continue
        if array.dtype != dtype:
            raise InvalidRequestError(f"{name}: expected {dtype.name.upper()}, got {array.dtype.name.upper()}")
        for i, value in enumerate(_rows(name, array, n)):
            controls[i][name] = cast(value)
    return [
        GenerationRequest(query_embeds=np.asarray(embeds[i], dtype=np.float32), prompt=prompts[i], **controls[i])
        for i in range(n)
    ]


def text_output(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)


def completion_outputs(completions: list[Any]) -> dict[str, np.ndarray]:
    """The LLM stage's outputs for finished rows (`llm.Completion`s): the text, and the optional extras."""
    return {
        "text_output": text_output([c.text for c in completions]),
        "num_output_tokens": np.array([[c.tokens] for c in completions], dtype=np.int32),
        "finish_reason": np.array([[c.finish_reason.encode()] for c in completions], dtype=np.object_),
        "num_input_tokens": np.array([[c.prompt_tokens] for c in completions], dtype=np.int32),
    }
