"""Just enough of the protobuf wire format to read a request's model name and id and to set its id, without
parsing (and copying) megabytes of tensor bytes: the gRPC proxy forwards the message it received."""

from __future__ import annotations

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


def string_fields(data: bytes, numbers: frozenset[int]) -> dict[int, str]:
    """The top-level length-delimited fields `numbers` of a message, decoded as UTF-8. For a field sent twice
    the last one wins, as in every protobuf parser."""
    found: dict[int, str] = {}
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
            if number in numbers:
                if pos + length > len(data):
                    raise WireError("truncated field")
                try:
                    found[number] = data[pos:pos + length].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise WireError(f"field {number} is not UTF-8") from e
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise WireError("truncated field")
    return found


def submessage_strings(data: bytes, number: int, inner: int) -> list[str]:
    """Field `inner` (a string) of every embedded message in the repeated top-level field `number`."""
    names: list[str] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field_number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _varint(data, pos)
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
        elif wire_type == _LEN:
            length, pos = _varint(data, pos)
            if field_number == number:
                names.append(string_fields(data[pos:pos + length], frozenset({inner})).get(inner, ""))
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise WireError("truncated field")
    return names


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
