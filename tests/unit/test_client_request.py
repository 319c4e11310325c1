from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from blip2_client import CONTROL_SPECS, Blip2Client, ModelMetadata, TensorSpec, vqa_prompt
from blip2_client._request import batch_prompts, build_inputs, control_tensors, decode_text, parse_url
from tritonclient.utils import deserialize_bytes_tensor

# The contract's public inputs (docs/CONTRACT.md).
CONTRACT_DTYPES = {
    "max_tokens": "INT32",
    "temperature": "FP32",
    "top_p": "FP32",
    "top_k": "INT32",
    "beam_width": "INT32",
    "repetition_penalty": "FP32",
    "seed": "UINT64",
}
ALL_CONTROLS: dict[str, Any] = {
    "max_tokens": 12,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "beam_width": 3,
    "repetition_penalty": 1.2,
    "seed": 2**64 - 1,
}


def test_control_specs_match_contract() -> None:
    assert {name: spec.datatype for name, spec in CONTROL_SPECS.items()} == CONTRACT_DTYPES


def test_all_controls_become_1x1_tensors_of_contract_dtype() -> None:
    tensors = control_tensors(ALL_CONTROLS)
    assert [t[0] for t in tensors] == list(CONTRACT_DTYPES)
    for name, datatype, arr in tensors:
        assert datatype == CONTRACT_DTYPES[name]
        assert arr.shape == (1, 1)
        assert arr.dtype == CONTROL_SPECS[name].dtype
        assert arr[0, 0] == pytest.approx(ALL_CONTROLS[name], rel=1e-6)
    assert dict((n, a) for n, _, a in tensors)["seed"][0, 0] == np.uint64(2**64 - 1)


def test_only_given_controls_are_sent() -> None:
    assert control_tensors({}) == []
    assert [t[0] for t in control_tensors({"top_k": 5, "temperature": None})] == ["top_k"]


def test_numpy_scalars_and_ints_for_floats_are_accepted() -> None:
    tensors = control_tensors({"max_tokens": np.int64(5), "temperature": 1, "top_p": np.float64(0.5)})
    assert [(n, a.dtype, a[0, 0]) for n, _, a in tensors] == [
        ("max_tokens", np.int32, 5),
        ("temperature", np.float32, 1.0),
        ("top_p", np.float32, 0.5),
    ]


def test_unknown_control_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="'max_new_tokens'"):
        control_tensors({"max_new_tokens": 5})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tokens", 2.5),
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("seed", np.bool_(True)),
        ("top_k", 1.0),
        ("temperature", "hot"),
        ("temperature", False),
        ("top_p", [0.5]),
    ],
)
def test_wrong_control_types_are_type_errors(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=name):
        control_tensors({name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_tokens", 2**31),
        ("top_k", -(2**31) - 1),
        ("seed", -1),
        ("seed", 2**64),
        ("temperature", float("nan")),
        ("top_p", float("inf")),
    ],
)
def test_unrepresentable_control_values_are_value_errors(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        control_tensors({name: value})


def test_out_of_range_but_representable_values_are_left_to_the_server() -> None:
    # The server owns the limits (e.g. BLIP2_MAX_MAX_TOKENS) and explains them.
    assert control_tensors({"max_tokens": -3, "temperature": -1.0})


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_build_inputs(module: Any) -> None:
    inputs = build_inputs(module, b"\x89PNG...", "Question: hi Answer:", {"max_tokens": 7, "seed": 1})
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
        ("image", "BYTES", [1, 1]),
        ("text_input", "BYTES", [1, 1]),
        ("max_tokens", "INT32", [1, 1]),
        ("seed", "UINT64", [1, 1]),
    ]
    if module is grpcclient:
        assert list(deserialize_bytes_tensor(inputs[0]._get_content())) == [b"\x89PNG..."]
        assert list(deserialize_bytes_tensor(inputs[1]._get_content())) == [b"Question: hi Answer:"]


@pytest.mark.parametrize("module", [grpcclient, httpclient], ids=["grpc", "http"])
def test_caption_sends_no_text_input(module: Any) -> None:
    assert [i.name() for i in build_inputs(module, b"img", None, {})] == ["image"]


def test_vqa_prompt() -> None:
    assert vqa_prompt("what is this?") == "Question: what is this? Answer:"


class _Result:
    def __init__(self, value: Any) -> None:
        self._value = value

    def as_numpy(self, name: str) -> Any:
        return self._value if name == "text_output" else None


def test_decode_text() -> None:
    assert decode_text(_Result(np.array([[b"a cat \xc3\xa9"]], dtype=np.object_))) == "a cat é"
    assert decode_text(_Result(np.array([b"flat"], dtype=np.object_))) == "flat"


@pytest.mark.parametrize("value", [None, np.array([], dtype=np.object_)])
def test_decode_text_without_output_is_an_error(value: Any) -> None:
    from blip2_client import Blip2Error

    with pytest.raises(Blip2Error, match="text_output"):
        decode_text(_Result(value))


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("localhost:8001", None, ("localhost:8001", "grpc", False)),
        ("localhost:8000", "http", ("localhost:8000", "http", False)),
        ("http://127.0.0.1:8000", None, ("127.0.0.1:8000", "http", False)),
        ("http://127.0.0.1:8000/", "http", ("127.0.0.1:8000", "http", False)),
        ("https://triton.example.com/blip2", None, ("triton.example.com/blip2", "http", True)),
        ("grpc://10.0.0.1:8001", None, ("10.0.0.1:8001", "grpc", False)),
    ],
)
def test_parse_url(url: str, protocol: Any, expected: tuple[str, str, bool]) -> None:
    assert parse_url(url, protocol) == expected


@pytest.mark.parametrize(
    ("url", "protocol"),
    [("http://h:8000", "grpc"), ("ftp://h:1", None), ("http://", None), ("h:1", "websocket")],
)
def test_parse_url_rejects(url: str, protocol: Any) -> None:
    with pytest.raises(ValueError):
        parse_url(url, protocol)


@pytest.mark.parametrize(
    "options",
    [
        {"timeout_s": 0},
        {"timeout_s": float("inf")},
        {"timeout_s": -1.0},
        {"retries": -1},
        {"retry_backoff_s": float("nan")},
        {"max_concurrency": 0},
    ],
)
def test_client_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Blip2Client("localhost:8001", **options)


def test_batch_prompts() -> None:
    assert batch_prompts(2, None, "prompts") == [None, None]
    assert batch_prompts(2, "p", "prompts") == ["p", "p"]
    assert batch_prompts(2, ("a", None), "prompts") == ["a", None]
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        batch_prompts(3, ["a", "b"], "prompts")


def test_model_metadata_from_grpc_and_http_json() -> None:
    tensor = {"name": "image", "datatype": "BYTES"}
    grpc_form = {
        "name": "blip2",
        "versions": ["1"],
        "platform": "ensemble",
        "inputs": [{**tensor, "shape": ["-1", "1"]}],
    }
    http_form = {**grpc_form, "inputs": [{**tensor, "shape": [-1, 1]}]}
    expected = ModelMetadata("blip2", ("1",), "ensemble", (TensorSpec("image", "BYTES", (-1, 1)),), ())
    assert ModelMetadata.from_dict(grpc_form) == expected
    assert ModelMetadata.from_dict(http_form) == expected


def test_a_generation_decodes_what_the_server_reports_and_none_for_the_rest() -> None:
    from blip2_client._request import decode_generation

    class Result:
        def __init__(self, outputs: dict[str, np.ndarray]) -> None:
            self.outputs = outputs

        def as_numpy(self, name: str) -> np.ndarray | None:
            return self.outputs.get(name)

    full = decode_generation(Result({
        "text_output": np.array([[b"a red circle"]], dtype=np.object_),
        "finish_reason": np.array([[b"stop"]], dtype=np.object_),
        "num_output_tokens": np.array([[4]], dtype=np.int32),
        "num_input_tokens": np.array([[33]], dtype=np.int32),
    }))
    assert (full.text, full.finish_reason, full.output_tokens, full.input_tokens) == ("a red circle", "stop", 4, 33)
    old = decode_generation(Result({"text_output": np.array([[b"hi"]], dtype=np.object_)}))
    assert (old.text, old.finish_reason, old.output_tokens, old.input_tokens) == ("hi", None, None, None)
