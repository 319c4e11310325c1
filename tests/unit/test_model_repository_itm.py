"""The retrieval model repository drafts agree with each other and with the conversions that will serve them."""

import re
from pathlib import Path

import numpy as np
import pytest

from blip2_triton import retrieval_serving as rs
from blip2_triton.errors import InvalidRequestError
from blip2_triton.retrieval import ImageOutputs

REPO = Path(__file__).resolve().parents[2] / "model_repository_itm"
PUBLIC = {
    "blip2_embed_image": ({"image": "TYPE_STRING"}, {"image_embeds": "TYPE_FP32"}),
    "blip2_embed_text": ({"text_input": "TYPE_STRING"}, {"text_embeds": "TYPE_FP32"}),
    "blip2_similarity": ({"image": "TYPE_STRING", "text_input": "TYPE_STRING"}, {"similarity": "TYPE_FP32"}),
    "blip2_match": ({"image": "TYPE_STRING", "text_input": "TYPE_STRING"}, {"match_probability": "TYPE_FP32"}),
}
STAGES = {
    "blip2_itm_vision": ("RetrievalVisionModel", ("image",), (rs.IMAGE_EMBEDS, rs.VISION_FEATURES)),
    "blip2_itm_text": ("RetrievalTextModel", ("text_input",), (rs.TEXT_EMBEDS,)),
    "blip2_itm_match_head": ("RetrievalMatchModel", (rs.VISION_FEATURES, "text_input"), ("match_probability",)),
    "blip2_itm_similarity_head": ("RetrievalSimilarityModel", (rs.IMAGE_EMBEDS, rs.TEXT_EMBEDS), ("similarity",)),
}


def _tensors(config: str, section: str) -> dict[str, str]:
    block = re.search(rf"^{section} \[(.*?)^\]", config, re.S | re.M)
    assert block, section
    return dict(re.findall(r'name: "(\w+)" data_type: (\w+)', block.group(1)))


def _read(model: str) -> str:
    return (REPO / model / "config.pbtxt").read_text()


def test_repository_holds_exactly_the_designed_models() -> None:
    assert {p.parent.name for p in REPO.glob("*/config.pbtxt")} == set(PUBLIC) | set(STAGES)
    for model in (*PUBLIC, *STAGES):
        assert f'name: "{model}"' in _read(model)


@pytest.mark.parametrize("model", sorted(PUBLIC))
def test_public_ensembles_wire_existing_stages_through_internal_tensors(model: str) -> None:
    config = _read(model)
    inputs, outputs = PUBLIC[model]
    assert 'platform: "ensemble"' in config
    assert (_tensors(config, "input"), _tensors(config, "output")) == (inputs, outputs)
    steps = re.findall(r'model_name: "(\w+)"', config)
    assert steps and set(steps) <= set(STAGES)
    produced = dict(re.findall(r'output_map \{ key: "(\w+)" value: "(\w+)" \}', config))
    consumed = dict(re.findall(r'input_map \{ key: "(\w+)" value: "(\w+)" \}', config))
    internal = {v for v in (*produced.values(), *consumed.values()) if v not in inputs and v not in outputs}
    assert all(name.startswith("_") for name in internal)
    assert set(outputs) <= set(produced.values())
    # Each step's tensors are ones its stage declares.
    blocks = re.findall(r"\{\s*model_name: .*?\n    \}", config, re.S)
    assert len(blocks) == len(steps)
    for step in blocks:
        stage = re.search(r'model_name: "(\w+)"', step).group(1)  # type: ignore[union-attr]
        stage_config = _read(stage)
        assert set(re.findall(r'input_map \{ key: "(\w+)"', step)) <= set(_tensors(stage_config, "input"))
        assert set(re.findall(r'output_map \{ key: "(\w+)"', step)) <= set(_tensors(stage_config, "output"))


@pytest.mark.parametrize("model", sorted(STAGES))
def test_stage_configs_match_the_conversions(model: str) -> None:
    glue, inputs, outputs = STAGES[model]
    config = _read(model)
    assert tuple(_tensors(config, "input")) == inputs
    assert tuple(_tensors(config, "output")) == outputs
    assert 'backend: "python"' in config and "dynamic_batching" in config
    assert 'key: "env_prefix" value: { string_value: "BLIP2_ITM_" }' in config
    shim = (REPO / model / "1" / "model.py").read_text()
    assert shim == (f"from blip2_triton.triton_model import {glue}, python_model\n\n"
                    f"TritonPythonModel = python_model({glue})\n")


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
