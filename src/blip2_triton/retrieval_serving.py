"""Triton-facing conversions for the retrieval models, without Triton: the numpy tensors of one request into
`retrieval` requests (one per row), and results back into output arrays. Tensor names are those of
`model_repository_itm/`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidRequestError
from .retrieval import (
    ImageOutputs,
    MatchRequest,
    RetrievalImageRequest,
    SimilarityRequest,
    SimilarityStage,
    TextRequest,
)
from .serving.tensors import Arrays, _as_bytes, _rows

IMAGE_EMBEDS = "_image_embeds"
VISION_FEATURES = "_vision_features"
TEXT_EMBEDS = "_text_embeds"
SIMILARITY = "similarity"


def _required(inputs: Arrays, name: str) -> np.ndarray:
    array = inputs.get(name)
    if array is None:
        raise InvalidRequestError(f"{name}: required input is missing")
    return array


def _text(raw: Any) -> str:
    try:
        return _as_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"text_input: expected UTF-8 text, got invalid byte at offset {e.start}") from e


def _embeddings(name: str, inputs: Arrays, ndim: int, rows: int | None = None) -> np.ndarray:
    array = _required(inputs, name)
    if array.ndim != ndim + 1:
        raise InvalidRequestError(f"{name}: expected {ndim + 1} dims [batch, ...], got shape {list(array.shape)}")
    if rows is not None and array.shape[0] != rows:
        raise InvalidRequestError(f"{name}: expected {rows} rows like the other inputs, got {array.shape[0]}")
    return array


def image_requests(inputs: Arrays, requested: set[str]) -> list[RetrievalImageRequest]:
    """`requested`: the output names the caller asked for (an ensemble step asks only for those it maps)."""
    return [
        RetrievalImageRequest(_as_bytes(v), image_embeds=IMAGE_EMBEDS in requested,
                              vision_features=VISION_FEATURES in requested)
        for v in _rows("image", _required(inputs, "image"), None)
    ]


def text_requests(inputs: Arrays) -> list[TextRequest]:
    return [TextRequest(_text(v)) for v in _rows("text_input", _required(inputs, "text_input"), None)]


def match_requests(inputs: Arrays) -> list[MatchRequest]:
    features = _embeddings(VISION_FEATURES, inputs, 2)
    texts = _rows("text_input", _required(inputs, "text_input"), features.shape[0])
    return [MatchRequest(np.asarray(f, dtype=np.float32), _text(t)) for f, t in zip(features, texts, strict=True)]


def text_image_embeds(inputs: Arrays, rows: int, requested: set[str]) -> np.ndarray | None:
    """The image embeddings the text stage scores its texts against, one row per text, when `similarity` is
    requested (blip2_similarity's last step); None otherwise."""
    if SIMILARITY not in requested:
        return None
    return _embeddings(IMAGE_EMBEDS, inputs, 2, rows)


def text_outputs(embeds: list[np.ndarray], requested: set[str], image_embeds: np.ndarray | None,
                 similarity: SimilarityStage) -> dict[str, np.ndarray]:
    """The text stage's requested outputs for one request's rows; raises the first row's InvalidRequestError."""
    out: dict[str, np.ndarray] = {}
    if TEXT_EMBEDS in requested:
        out[TEXT_EMBEDS] = np.stack(embeds).astype(np.float32, copy=False)
    if SIMILARITY in requested:
        if image_embeds is None:
            raise InvalidRequestError(f"{IMAGE_EMBEDS}: required input is missing")
        scores = similarity.run([SimilarityRequest(np.asarray(i, dtype=np.float32), t)
                                 for i, t in zip(image_embeds, embeds, strict=True)])
        error = next((s for s in scores if isinstance(s, InvalidRequestError)), None)
        if error is not None:
            raise error
        out[SIMILARITY] = score_output(scores)  # type: ignore[arg-type]
    return out


def image_outputs(results: list[ImageOutputs], requested: set[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if IMAGE_EMBEDS in requested:
        out[IMAGE_EMBEDS] = np.stack([r.image_embeds for r in results]).astype(np.float32, copy=False)
    if VISION_FEATURES in requested:
        out[VISION_FEATURES] = np.stack([r.vision_features for r in results]).astype(np.float32, copy=False)
    return out


def score_output(scores: list[float]) -> np.ndarray:
    return np.asarray(scores, dtype=np.float32).reshape(-1, 1)
