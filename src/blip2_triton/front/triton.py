"""Triton's KServe v2 gRPC messages for the gateway: building a `blip2` request, reading its outputs, and what a
Triton error means for an HTTP client."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

# Public control tensors of the `blip2` ensembles (docs/CONTRACT.md): datatype, numpy type.
CONTROL_TYPES: dict[str, tuple[str, str]] = {
    "max_tokens": ("INT32", "<i4"),
    "temperature": ("FP32", "<f4"),
    "top_p": ("FP32", "<f4"),
    "top_k": ("INT32", "<i4"),
    "beam_width": ("INT32", "<i4"),
    "repetition_penalty": ("FP32", "<f4"),
    "seed": ("UINT64", "<u8"),
}
NUMPY_TYPES = {"INT32": "<i4", "INT64": "<i8", "UINT64": "<u8", "FP32": "<f4", "BOOL": "?"}
TEXT_OUTPUT = "text_output"
# Optional outputs the ensembles may report; the gateway asks for those the model's metadata lists.
USAGE_OUTPUTS = ("num_input_tokens", "num_output_tokens", "finish_reason")
FINAL_RESPONSE = "triton_final_response"


def bytes_tensor(*items: bytes) -> bytes:
    # Triton's BYTES wire format: each element is a little-endian uint32 length, then its bytes.
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def split_bytes_tensor(raw: bytes) -> list[bytes]:
    items, pos = [], 0
    while pos + 4 <= len(raw):
        (length,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4:pos + 4 + length])
        pos += 4 + length
    return items


def infer_request(model: str, request_id: str, image: bytes, prompt: str | None,
                  controls: Mapping[str, int | float], outputs: tuple[str, ...], *,
                  stream: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)

    def add(name: str, datatype: str, raw: bytes) -> None:
        request.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        request.raw_input_contents.append(raw)

    add("image", "BYTES", bytes_tensor(image))
    if prompt is not None:
        add("text_input", "BYTES", bytes_tensor(prompt.encode("utf-8")))
    for name, value in controls.items():
        datatype, np_type = CONTROL_TYPES[name]
        add(name, datatype, np.array([value], dtype=np_type).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    if stream:
        # The last response of a decoupled model carries only the "final" flag; without this Triton drops it.
        request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def response_outputs(response: pb.ModelInferResponse) -> dict[str, list[bytes] | np.ndarray]:
    values: dict[str, list[bytes] | np.ndarray] = {}
    for index, output in enumerate(response.outputs):
        raw = response.raw_output_contents[index] if index < len(response.raw_output_contents) else b""
        if output.datatype == "BYTES":
            values[output.name] = split_bytes_tensor(raw)
        elif output.datatype in NUMPY_TYPES:
            values[output.name] = np.frombuffer(raw, dtype=NUMPY_TYPES[output.datatype])
    return values


def text_of(outputs: Mapping[str, list[bytes] | np.ndarray]) -> str:
    items = outputs.get(TEXT_OUTPUT)
    if not isinstance(items, list) or not items:
        return ""
    return items[0].decode("utf-8", errors="replace")


def is_final(response: pb.ModelInferResponse) -> bool:
    param = response.parameters.get(FINAL_RESPONSE)
    return bool(param is not None and param.bool_param)


# Invalid input messages start with the name of the input at fault (docs/CONTRACT.md); Triton may put the
# ensemble's name first.
_INPUT_ERROR = re.compile(
    r"^(in ensemble '[^']*', )?(image|text_input|max_tokens|temperature|top_p|top_k|beam_width|repetition_penalty|"
    r"seed|text_input \+ max_tokens|beam_width > 1)\b")
_UNHEALTHY = ("Stub process", "is not healthy", "Server is stopping")


def http_status_for(code: grpc.StatusCode | None, message: str) -> int:
    """What a Triton failure means for an HTTP client: its fault (400), Triton unavailable (503), a timeout (504)
    or the server's fault (500)."""
    if any(marker in message for marker in _UNHEALTHY):
        return 503
    if code == grpc.StatusCode.INVALID_ARGUMENT or (code is None and _INPUT_ERROR.match(message)):
        return 400
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED):
        return 503
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return 504
    return 500
