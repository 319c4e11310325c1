"""Image-text retrieval and matching requests: the tensors of the server's four entry points, and the contrastive
score computed locally (what `blip2 search` ranks with)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ._errors import Blip2Error
from ._images import ImageInput, encode_image

T = TypeVar("T")


@dataclass(frozen=True)
class RetrievalModels:
    """Names of the server's retrieval entry points (`model_repository_itm/`)."""

    embed_image: str = "blip2_embed_image"
    embed_text: str = "blip2_embed_text"
    similarity: str = "blip2_similarity"
    match: str = "blip2_match"


# Each entry point's output and its per-request dims (after the batch dim): [queries, dim], [dim], [1], [1].
OUTPUTS = {"embed_image": ("image_embeds", 2), "embed_text": ("text_embeds", 1), "similarity": ("similarity", 1),
           "match": ("match_probability", 1)}


def check_text(text: object) -> str:
    # Anything else would be sent as its repr; an empty text is the server's to refuse (with its message).
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    return text


def retrieval_inputs(tc: ModuleType, image: bytes | None, text: str | None) -> list[Any]:
    """One request's `image` and/or `text_input` tensors; `tc` is tritonclient.grpc or tritonclient.http."""
    inputs = []
    for name, value in (("image", image), ("text_input", None if text is None else text.encode("utf-8"))):
        if value is None:
            continue
        tensor = tc.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(tensor)
    return inputs


def output_array(result: Any, name: str, ndim: int) -> npt.NDArray[np.float32]:
    """The one row of a response's output `name`, as float32 with `ndim` dims."""
    out = result.as_numpy(name)
    if out is None or out.ndim != ndim + 1 or out.shape[0] != 1:
        shape = None if out is None else list(out.shape)
        raise Blip2Error(f"server response has no {name} of {ndim + 1} dims [1, ...] (got {shape})")
    return np.asarray(out[0], dtype=np.float32)


def stacked(rows: Sequence[npt.NDArray[np.float32]], ndim: int) -> npt.NDArray[np.float32]:
    """Rows stacked into one array; an empty input gives shape (0, 0, ...) with the rows' dims."""
    if not rows:
        return np.zeros((0,) * (ndim + 1), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)


def batch_texts(n: int, texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts] * n
    texts = [check_text(t) for t in texts]
    if len(texts) != n:
        raise ValueError(f"got {n} images but {len(texts)} texts")
    return texts


def batch_jobs(
    retrieve: Callable[[str, bytes | None, str | None, float | None], T], entry: str, timeout_s: float | None, *,
    images: Iterable[ImageInput] | None = None, texts: str | Sequence[str] | None = None,
) -> list[Callable[[], T]]:
    """One `retrieve(entry, image, text, timeout_s)` call per item of a batch method: every image encoded and every
    text checked before anything is sent; with images, `texts` is one text for all or one per image."""
    encoded = None if images is None else [encode_image(image) for image in images]
    if texts is None:
        per_item: list[str | None] = [None] * len(encoded or [])
    elif encoded is None:
        per_item = [check_text(t) for t in texts]
    else:
        per_item = list(batch_texts(len(encoded), check_text(texts) if isinstance(texts, str) else texts))
    data: list[bytes | None] = list(encoded) if encoded is not None else [None] * len(per_item)
    return [partial(retrieve, entry, d, t, timeout_s) for d, t in zip(data, per_item, strict=True)]


def similarity_scores(image_embeds: npt.ArrayLike, text_embeds: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The server's `similarity` for every pair: image embeddings [images, queries, dim] (or one image
    [queries, dim]) against text embeddings [texts, dim] (or one text [dim]) give [images, texts] (dims of a single
    image or text dropped). The largest dot product over the queries, as Blip2ForImageTextRetrieval's
    logits_per_image; computed in float32."""
    images = np.asarray(image_embeds, dtype=np.float32)
    texts = np.asarray(text_embeds, dtype=np.float32)
    one_image, one_text = images.ndim == 2, texts.ndim == 1
    images = images[None] if one_image else images
    texts = texts[None] if one_text else texts
    if images.ndim != 3 or texts.ndim != 2 or images.shape[2] != texts.shape[1]:
        raise ValueError(f"expected image embeddings [images, queries, dim] and text embeddings [texts, dim] of the "
                         f"same dim, got {list(images.shape)} and {list(texts.shape)}")
    scores = np.einsum("iqd,td->itq", images, texts).max(axis=2)
    if one_text:
        scores = scores[:, 0]
    return scores[0] if one_image else scores
