"""KServe v2 HTTP request/response bodies using Triton's binary tensor extension."""

from __future__ import annotations

import json
import struct

HEADER_LENGTH = "Inference-Header-Content-Length"


def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    # Triton's BYTES wire format: each element is a little-endian uint32 length followed by the raw bytes.
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes_tensor(data: bytes) -> list[bytes]:
    items = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ValueError("truncated BYTES tensor length")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise ValueError("truncated BYTES tensor element")
        items.append(data[pos : pos + length])
        pos += length
    return items


def encode_infer_request(
    image: bytes, prompt: str | None = None, max_tokens: int | None = None, output: str = "text_output"
) -> tuple[bytes, dict[str, str]]:
    inputs: list[dict] = []
    blobs: list[bytes] = []

    def add_bytes(name: str, value: bytes) -> None:
        blob = serialize_bytes_tensor([value])
        inputs.append(
            {"name": name, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
        )
        blobs.append(blob)

    add_bytes("image", image)
    if prompt:
        add_bytes("text_input", prompt.encode("utf-8"))
    if max_tokens is not None:
        # A scalar gains nothing from binary framing, so it stays in the JSON header.
        inputs.append({"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [max_tokens]})
    header = json.dumps(
        {"inputs": inputs, "outputs": [{"name": output, "parameters": {"binary_data": True}}]},
        separators=(",", ":"),
    ).encode("utf-8")
    headers = {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }
    return header + b"".join(blobs), headers


def decode_infer_response(body: bytes, header_length: int | None, output: str = "text_output") -> list[str]:
    """Return the BYTES output as text; `header_length` is the response's Inference-Header-Content-Length."""
    if header_length is None:
        header, binary = json.loads(body), b""
    else:
        header, binary = json.loads(body[:header_length]), body[header_length:]
    offset = 0
    for out in header.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out.get("name") != output:
            offset += size or 0
            continue
        if size is None:
            return [str(item) for item in _flatten(out.get("data", []))]
        if offset + size > len(binary):
            raise ValueError(f"response binary section too short for {output}")
        items = deserialize_bytes_tensor(binary[offset : offset + size])
        return [item.decode("utf-8", errors="replace") for item in items]
    raise ValueError(f"response has no output {output!r}")


def _flatten(data: list) -> list:
    flat = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat
