"""The model repository's configs agree with each other and with the code that serves them."""

import itertools
import re
from pathlib import Path

import pytest

from blip2_triton import retrieval_serving as rs
from blip2_triton.serving import CONTROL_DTYPES, LLM_INPUTS

REPO = Path(__file__).resolve().parents[2] / "model_repository"
# Retrieval models (docs/RETRIEVAL.md).
ITM = REPO.parent / "model_repository_itm"
ITM_PUBLIC = {
    "blip2_embed_image": ({"image": "TYPE_STRING"}, {"image_embeds": "TYPE_FP32"}),
    "blip2_embed_text": ({"text_input": "TYPE_STRING"}, {"text_embeds": "TYPE_FP32"}),
    "blip2_similarity": ({"image": "TYPE_STRING", "text_input": "TYPE_STRING"}, {"similarity": "TYPE_FP32"}),
    "blip2_match": ({"image": "TYPE_STRING", "text_input": "TYPE_STRING"}, {"match_probability": "TYPE_FP32"}),
}
ITM_STAGES = {
    "blip2_itm_vision": ("RetrievalVisionModel", ("image",), (rs.IMAGE_EMBEDS, rs.VISION_FEATURES)),
    "blip2_itm_text": ("RetrievalTextModel", ("text_input", rs.IMAGE_EMBEDS), (rs.TEXT_EMBEDS, rs.SIMILARITY)),
    "blip2_itm_match_head": ("RetrievalMatchModel", (rs.VISION_FEATURES, "text_input"), ("match_probability",)),
}


def _tensors(config: str, section: str) -> dict[str, str]:
    block = re.search(rf"^{section} \[(.*?)^\]", config, re.S | re.M)
    assert block, section
    return dict(re.findall(r'name: "(\w+)" data_type: (\w+)', block.group(1)))


def _read(model: str, repo: Path = REPO) -> str:
    return (repo / model / "config.pbtxt").read_text()


def test_public_contract_of_the_ensemble() -> None:
    config = _read("blip2")
    inputs = _tensors(config, "input")
    assert inputs == {
        "image": "TYPE_STRING", "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32",
        "temperature": "TYPE_FP32", "top_p": "TYPE_FP32", "top_k": "TYPE_INT32", "beam_width": "TYPE_INT32",
        "repetition_penalty": "TYPE_FP32", "seed": "TYPE_UINT64",
    }
    assert _tensors(config, "output") == {"text_output": "TYPE_STRING", "num_output_tokens": "TYPE_INT32",
                                          "finish_reason": "TYPE_STRING", "num_input_tokens": "TYPE_INT32"}
    assert int(re.search(r"max_batch_size: (\d+)", config).group(1)) >= 8
    assert 'platform: "ensemble"' in config


def test_stage_inputs_match_the_code() -> None:
    llm = _tensors(_read("blip2_llm"), "input")
    assert tuple(llm) == (*LLM_INPUTS, "_job_id", "_poll_id", "_cancel_id")
    triton_types = {"int32": "TYPE_INT32", "float32": "TYPE_FP32", "uint64": "TYPE_UINT64"}
    for name, (_, dtype) in CONTROL_DTYPES.items():
        assert llm[name] == triton_types[dtype.name]
    assert _tensors(_read("blip2_vision"), "output") == {"_query_embeds": "TYPE_FP32"}


def test_ensembles_wire_every_llm_input() -> None:
    config = _read("blip2")
    mapped = set(re.findall(r'input_map \{ key: "(\w+)"', config))
    assert mapped == {"image", *LLM_INPUTS}
    assert 'model_name: "blip2_llm"' in config
    internal = set(re.findall(r'output_map \{ key: "(\w+)"', config)) - {"text_output", "num_output_tokens",
                                                                          "finish_reason", "num_input_tokens"}
    assert internal and all(name.startswith("_") for name in internal)
    # The streaming front end offers exactly the public contract, and talks to the same LLM stage.
    stream = _read("blip2_stream")
    assert _tensors(stream, "input") == _tensors(config, "input")
    assert _tensors(stream, "output") == _tensors(config, "output")
    assert 'string_value: "blip2_llm"' in stream and "decoupled: true" in stream
    # Plain infer reaches the LLM stage through the ensemble, which a decoupled step would make decoupled too.
    assert "model_transaction_policy" not in _read("blip2_llm")


def test_t5_repository_mirrors_the_opt_one() -> None:
    t5 = REPO.parent / "model_repository_t5"
    for model in ("blip2", "blip2_vision", "blip2_llm", "blip2_stream"):
        twin = (t5 / model.replace("blip2", "blip2_t5") / "config.pbtxt").read_text()
        for section in ("input", "output"):
            assert _tensors(twin, section) == _tensors(_read(model), section), (model, section)


def test_stage_models_batch_dynamically_and_stay_thin() -> None:
    for model in ("blip2_vision", "blip2_llm", "blip2_stream"):
        # The stream front end forwards the requests of one execute() one after another, so it must get one
        # request per call (Triton's default scheduler) while its other instances take the next streams.
        batches = model != "blip2_stream"
        t5 = REPO.parent / "model_repository_t5" / model.replace("blip2", "blip2_t5") / "config.pbtxt"
        for config in (_read(model), t5.read_text()):
            assert ("dynamic_batching {" in config) == batches, model
        source = (REPO / model / "1" / "model.py").read_text()
        assert len(source.splitlines()) <= 5 and "torch" not in source


def test_llm_stages_run_exactly_one_instance() -> None:
    # Streams live in the LLM stage's process: a second instance would receive polls for jobs it does not hold
    # (and load a second copy of the weights).
    t5 = REPO.parent / "model_repository_t5" / "blip2_t5_llm" / "config.pbtxt"
    for config in (_read("blip2_llm"), t5.read_text()):
        assert re.findall(r"instance_group \[ \{ count: (\d+)", config) == ["1"]
        assert "model_transaction_policy" not in config


def test_generated_text_is_up_to_date() -> None:
    from blip2_triton.generated import sync

    assert sync(REPO.parent, write=False) == []


def test_a_hand_edited_block_is_caught(tmp_path: Path) -> None:
    from blip2_triton.generated import FILES, sync

    for relative in FILES:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text((REPO.parent / relative).read_text())
    llm = tmp_path / "model_repository_t5" / "blip2_t5_llm" / "config.pbtxt"
    llm.write_text(llm.read_text().replace('"seed" data_type: TYPE_UINT64', '"seed" data_type: TYPE_INT64'))
    ensemble = tmp_path / "model_repository" / "blip2" / "config.pbtxt"
    ensemble.write_text(ensemble.read_text().replace("  # <<< generated\n", "  # end\n", 1))
    assert sync(tmp_path, write=False) == [
        "model_repository/blip2/config.pbtxt: generated blocks ('llm_input_map',), expected ('public_inputs', "
        "'llm_input_map')",
        "model_repository_t5/blip2_t5_llm/config.pbtxt: out of date; run python -m blip2_triton.generated --write",
    ]
    assert sync(tmp_path, write=True) == sync(tmp_path, write=False) == [sync(tmp_path, write=False)[0]]
    assert llm.read_text() == (REPO.parent / "model_repository_t5" / "blip2_t5_llm" / "config.pbtxt").read_text()


def test_config_parameters_only_where_a_model_differs() -> None:
    # Defaults live in ServerOptions; a parameter repeating one would drift from it.
    from dataclasses import fields

    from blip2_triton.options import ServerOptions

    defaults = {f.name: str(f.default) for f in fields(ServerOptions)}
    per_model = {"env_prefix", "vision_model", "llm_model"}
    for config in REPO.parent.glob("model_repository*/*/config.pbtxt"):
        text = config.read_text()
        for key, value in re.findall(r'parameters: \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', text):
            assert key in per_model or (key in defaults and value != defaults[key]), (config, key, value)


def test_itm_repository_holds_exactly_the_designed_models() -> None:
    assert {p.parent.name for p in ITM.glob("*/config.pbtxt")} == set(ITM_PUBLIC) | set(ITM_STAGES)
    for model in (*ITM_PUBLIC, *ITM_STAGES):
        assert f'name: "{model}"' in _read(model, ITM)


@pytest.mark.parametrize("model", sorted(ITM_PUBLIC))
def test_itm_ensembles_wire_existing_stages_through_internal_tensors(model: str) -> None:
    config = _read(model, ITM)
    inputs, outputs = ITM_PUBLIC[model]
    assert 'platform: "ensemble"' in config
    assert (_tensors(config, "input"), _tensors(config, "output")) == (inputs, outputs)
    steps = re.findall(r'model_name: "(\w+)"', config)
    assert steps and set(steps) <= set(ITM_STAGES)
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
        stage_config = _read(stage, ITM)
        assert set(re.findall(r'input_map \{ key: "(\w+)"', step)) <= set(_tensors(stage_config, "input"))
        assert set(re.findall(r'output_map \{ key: "(\w+)"', step)) <= set(_tensors(stage_config, "output"))


@pytest.mark.parametrize("model", sorted(ITM_STAGES))
def test_itm_stage_configs_match_the_conversions(model: str) -> None:
    glue, inputs, outputs = ITM_STAGES[model]
    config = _read(model, ITM)
    assert tuple(_tensors(config, "input")) == inputs
    assert tuple(_tensors(config, "output")) == outputs
    assert 'backend: "python"' in config and "dynamic_batching" in config
    assert 'key: "env_prefix" value: { string_value: "BLIP2_ITM_" }' in config
    shim = (ITM / model / "1" / "model.py").read_text()
    assert shim == (f"from blip2_triton.serving.models import {glue}, python_model\n\n"
                    f"TritonPythonModel = python_model({glue})\n")


def test_no_ensemble_runs_two_steps_at_once() -> None:
    # Each step after the first consumes an output of the step before it. With two steps in flight, a failing one
    # made Triton 2.51 finish the ensemble while the other still ran, and later requests arrived corrupted
    # (docs/RETRIEVAL.md).
    for config in REPO.parent.glob("model_repository*/*/config.pbtxt"):
        text = config.read_text()
        if 'platform: "ensemble"' not in text:
            continue
        blocks = re.findall(r"\{\s*model_name: .*?\n    \}", text, re.S)
        for before, step in itertools.pairwise(blocks):
            produced = set(re.findall(r'output_map \{ key: "\w+" value: "(\w+)" \}', before))
            consumed = set(re.findall(r'input_map \{ key: "\w+" value: "(\w+)" \}', step))
            assert produced & consumed, f"{config}: a step does not wait for the one before it"
