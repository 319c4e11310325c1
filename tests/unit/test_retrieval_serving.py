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
    assert rs.score_output([0.5, 0.25]).tolist() == [[0.5], [0.25]]


def test_the_text_stage_scores_against_image_embeddings_only_when_asked() -> None:
    from transformers import Blip2Config

    from blip2_triton.retrieval import SimilarityStage

    config = Blip2Config(num_query_tokens=2, image_text_hidden_size=3)
    similarity = SimilarityStage(config)
    images = np.zeros((2, 2, 3), np.float32)
    images[0, 1], images[1, 0] = [1, 0, 0], [0, 1, 0]
    texts = [np.array([1, 0, 0], np.float32), np.array([0.6, 0.8, 0], np.float32)]
    inputs = {rs.IMAGE_EMBEDS: images}
    assert rs.text_image_embeds(inputs, 2, {rs.TEXT_EMBEDS}) is None
    pairs = rs.text_image_embeds(inputs, 2, {rs.SIMILARITY})
    out = rs.text_outputs(texts, {rs.SIMILARITY}, pairs, similarity)
    assert list(out) == [rs.SIMILARITY] and out[rs.SIMILARITY].tolist() == [[1.0], [pytest.approx(0.8)]]
    assert list(rs.text_outputs(texts, {rs.TEXT_EMBEDS}, None, similarity)) == [rs.TEXT_EMBEDS]
    with pytest.raises(InvalidRequestError, match="_image_embeds: required input is missing"):
        rs.text_image_embeds({}, 2, {rs.SIMILARITY})
    with pytest.raises(InvalidRequestError, match="_image_embeds: expected 3 rows like the other inputs, got 2"):
        rs.text_image_embeds(inputs, 3, {rs.SIMILARITY})
    with pytest.raises(InvalidRequestError, match=r"_image_embeds: expected shape \[2, 3\], got \[1, 3\]"):
        rs.text_outputs(texts, {rs.SIMILARITY}, images[:, :1], similarity)
