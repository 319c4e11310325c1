"""Tensor conversions of the retrieval models (blip2_triton.retrieval_serving)."""

import numpy as np
import pytest

from blip2_triton import retrieval_serving as rs
from blip2_triton.errors import InvalidRequestError
from blip2_triton.retrieval import ImageOutputs


def _bytes(*values: bytes) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.object_)


def test_image_requests_ask_for_what_the_step_maps() -> None:
    (embeds,) = rs.image_requests({"image": _bytes(b"x")}, {rs.IMAGE_EMBEDS})
    (features,) = rs.image_requests({"image": _bytes(b"x")}, {rs.VISION_FEATURES})
    assert (embeds.image_embeds, embeds.vision_features) == (True, False)
    assert (features.image_embeds, features.vision_features) == (False, True)
    results = [ImageOutputs(image_embeds=np.ones((2, 3)), vision_features=None)] * 2
    out = rs.image_outputs(results, {rs.IMAGE_EMBEDS})
    assert list(out) == [rs.IMAGE_EMBEDS] and out[rs.IMAGE_EMBEDS].shape == (2, 2, 3)
    assert out[rs.IMAGE_EMBEDS].dtype == np.float32


def test_text_and_pair_conversions() -> None:
    texts = rs.text_requests({"text_input": _bytes("a ☃".encode(), b"")})
    assert [t.text for t in texts] == ["a ☃", ""]  # empty text is refused by the stage, with its own message
    with pytest.raises(InvalidRequestError, match="text_input: expected UTF-8 text, got invalid byte at offset 1"):
        rs.text_requests({"text_input": _bytes(b"a\xff")})
    with pytest.raises(InvalidRequestError, match="text_input: required input is missing"):
        rs.text_requests({})
    features = np.zeros((2, 4, 3), np.float32)
    pairs = rs.match_requests({rs.VISION_FEATURES: features, "text_input": _bytes(b"a", b"b")})
    assert [(p.vision_features.shape, p.text) for p in pairs] == [((4, 3), "a"), ((4, 3), "b")]
    with pytest.raises(InvalidRequestError, match="text_input: expected 2 rows like the other inputs, got 1"):
        rs.match_requests({rs.VISION_FEATURES: features, "text_input": _bytes(b"a")})
    with pytest.raises(InvalidRequestError, match=r"_text_embeds: expected 2 dims \[batch, ...\], got shape \[2\]"):
        rs.similarity_requests({rs.IMAGE_EMBEDS: features, rs.TEXT_EMBEDS: np.zeros(2, np.float32)})
    scored = rs.similarity_requests({rs.IMAGE_EMBEDS: features, rs.TEXT_EMBEDS: np.zeros((2, 3), np.float32)})
    assert [s.text_embeds.shape for s in scored] == [(3,), (3,)]
    assert rs.score_output([0.5, 0.25]).tolist() == [[0.5], [0.25]]
