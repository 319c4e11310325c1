from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `loadtest` is a plain directory of the checkout, not an installed package

from loadtest.kserve import (  # noqa: E402
    HEADER_LENGTH,
    decode_infer_response,
    deserialize_bytes_tensor,
    encode_infer_request,
    serialize_bytes_tensor,
)


def test_bytes_tensor_round_trip() -> None:
    items = [b"", b"abc", bytes(range(256))]
    blob = serialize_bytes_tensor(items)
    assert blob[:4] == struct.pack("<I", 0)
    assert deserialize_bytes_tensor(blob) == items
    with pytest.raises(ValueError):
        deserialize_bytes_tensor(blob[:-1])


def test_encode_request_layout() -> None:
    image = b"\xff\xd8jpeg-bytes"
    body, headers = encode_infer_request(image, "Question: what? Answer:", 12)
    header_len = int(headers[HEADER_LENGTH])
    assert headers["Content-Type"] == "application/octet-stream"
    header = json.loads(body[:header_len])
    inputs = {i["name"]: i for i in header["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES" and inputs["image"]["shape"] == [1, 1]
    assert inputs["max_tokens"] == {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [12]}
    assert header["outputs"] == [{"name": "text_output", "parameters": {"binary_data": True}}]
    binary = body[header_len:]
    image_size = inputs["image"]["parameters"]["binary_data_size"]
    assert deserialize_bytes_tensor(binary[:image_size]) == [image]
    assert deserialize_bytes_tensor(binary[image_size:]) == [b"Question: what? Answer:"]


def test_encode_caption_request_omits_prompt_and_tokens() -> None:
    body, headers = encode_infer_request(b"img")
    header = json.loads(body[: int(headers[HEADER_LENGTH])])
    assert [i["name"] for i in header["inputs"]] == ["image"]


def _response(outputs: list[tuple[str, list[bytes]]]) -> tuple[bytes, int]:
    blobs = [serialize_bytes_tensor(items) for _, items in outputs]
    header = {
        "model_name": "blip2",
        "outputs": [
            {"name": name, "datatype": "BYTES", "shape": [1, len(items)], "parameters": {"binary_data_size": len(b)}}
            for (name, items), b in zip(outputs, blobs, strict=True)
        ],
    }
    head = json.dumps(header).encode()
    return head + b"".join(blobs), len(head)


def test_decode_binary_response_skips_other_outputs() -> None:
    body, header_len = _response([("other", [b"xx", b"yyy"]), ("text_output", ["a café".encode()])])
    assert decode_infer_response(body, header_len) == ["a café"]


def test_decode_json_response() -> None:
    body = json.dumps({"outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1, 1], "data": [["hi"]]}]})
    assert decode_infer_response(body.encode(), None) == ["hi"]


def test_decode_errors() -> None:
    body, header_len = _response([("text_output", [b"abc"])])
    with pytest.raises(ValueError):
        decode_infer_response(body[:-2], header_len)
    with pytest.raises(ValueError):
        decode_infer_response(body, header_len, output="missing")
