"""Protobuf wire format, for keeping pixels out of message objects.

A request is almost all pixel bytes. Parsed as a message, each frame would be copied twice
(into the parser's arena, then out as ``bytes``); instead the pixel fields are cut out of the
received buffer as zero-copy views, and protobuf parses what is left (a few hundred bytes).
Replies are framed the same way around the model's output (see ``messages.inference_reply``).
"""

from __future__ import annotations

from collections.abc import Iterator

#: RequestWrapper.r2, RequestInference.images, Image.image (field numbers of the protocol).
_R2, _IMAGES, _PIXELS = 3, 2, 4
_LEN = 2


class WireError(ValueError):
    pass


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its value, end of the field)."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value_start = pos
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LEN:
            length, value_start = _read_varint(buf, pos, end)
            pos = value_start + length
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {number})")
        if pos > end:
            raise WireError(f"field {number} runs past the end of its message")
        yield number, wire_type, field_start, value_start, pos


def split_pixels(body: bytes | bytearray | memoryview) -> tuple[bytes, list[memoryview]]:
    """A RequestWrapper without its pixel bytes, and those bytes (views into ``body``), one per
    image in order. Everything else is kept byte for byte, so protobuf's parse of the rest, merge
    rules included, is the same as for the whole message."""
    buf = memoryview(body).cast("B")
    top, r2, pixels, has_r2 = bytearray(), bytearray(), [], False
    for number, wire_type, start, value, end in _fields(buf, 0, len(buf)):
        if number != _R2 or wire_type != _LEN:
            top += buf[start:end]
            continue
        has_r2 = True
        for number2, wire_type2, start2, value2, end2 in _fields(buf, value, end):
            if number2 != _IMAGES or wire_type2 != _LEN:
                r2 += buf[start2:end2]
                continue
            image, data = bytearray(), buf[0:0]
            for number3, wire_type3, start3, value3, end3 in _fields(buf, value2, end2):
                if number3 == _PIXELS and wire_type3 == _LEN:
                    data = buf[value3:end3]  # the last occurrence wins, as for any bytes field
                else:
                    image += buf[start3:end3]
            r2 += bytes([_IMAGES << 3 | _LEN]) + varint(len(image)) + image
            pixels.append(data)
    if has_r2:
        top += bytes([_R2 << 3 | _LEN]) + varint(len(r2)) + r2
    return bytes(top), pixels
