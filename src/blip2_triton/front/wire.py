"""Just enough of the protobuf wire format to read a request's model name and id and to set its id, without
parsing (and copying) megabytes of tensor bytes: the gRPC proxy forwards the message it received."""

from __future__ import annotations

from collections.abc import Iterator

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _length_delimited(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every top-level length-delimited field's payload, in order; other fields are
    skipped. Positions, not slices: the callers copy only the few small fields they read, never the tensors."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise WireError("truncated field")
            yield number, pos, pos + length
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise WireError("truncated field")


def string_fields(data: bytes, numbers: frozenset[int]) -> dict[int, str]:
    """The top-level length-delimited fields `numbers` of a message, decoded as UTF-8. For a field sent twice
    the last one wins, as in every protobuf parser."""
    found: dict[int, str] = {}
    for number, start, end in _length_delimited(data):
        if number in numbers:
            try:
                found[number] = data[start:end].decode("utf-8")
            except UnicodeDecodeError as e:
                raise WireError(f"field {number} is not UTF-8") from e
    return found


def submessage_strings(data: bytes, number: int, inner: int) -> list[str]:
    """Field `inner` (a string) of every embedded message in the repeated top-level field `number`."""
    return [string_fields(data[start:end], frozenset({inner})).get(inner, "")
            for field_number, start, end in _length_delimited(data) if field_number == number]


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_string_field(data: bytes, number: int, value: str) -> bytes:
    """`data` with a singular string field set to `value`: appended, since the last occurrence wins."""
    encoded = value.encode("utf-8")
    return data + _encode_varint(number << 3 | _LEN) + _encode_varint(len(encoded)) + encoded
