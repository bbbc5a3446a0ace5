"""A stand-in for the MLClient Nuke node, written from the protocol description in issue #3.

It deliberately shares nothing with the gateway: the message types are built here from the
field list (in a private descriptor pool), and the framing and the pixel encoding (float32 LE,
planar, rows bottom-up) are written out again, so a mistake in the gateway cannot cancel out.
"""

from __future__ import annotations

import socket
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_SCALARS = {"bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32, "float": _F.TYPE_FLOAT, "string": _F.TYPE_STRING,
            "bytes": _F.TYPE_BYTES}

# message -> [(label, type, name, number, packed)], straight from the issue text.
_MESSAGES: dict[str, list[tuple[int, str, str, int, bool]]] = {
    "RequestWrapper": [(_OPT, "bool", "info", 1, False), (_OPT, "RequestInfo", "r1", 2, False),
                       (_OPT, "RequestInference", "r2", 3, False)],
    "RespondWrapper": [(_OPT, "bool", "info", 1, False), (_OPT, "RespondInfo", "r1", 2, False),
                       (_OPT, "RespondInference", "r2", 3, False), (_OPT, "Error", "error", 4, False)],
    "RequestInfo": [(_OPT, "bool", "info", 1, False)],
    "RespondInfo": [(_OPT, "int32", "num_models", 1, False), (_REP, "Model", "models", 2, False)],
    "Model": [(_OPT, "string", "name", 1, False), (_OPT, "string", "label", 2, False),
              (_REP, "ImagePrototype", "inputs", 3, False), (_REP, "ImagePrototype", "outputs", 4, False),
              (_REP, "BoolAttrib", "bool_options", 5, False), (_REP, "IntAttrib", "int_options", 6, False),
              (_REP, "FloatAttrib", "float_options", 7, False), (_REP, "StringAttrib", "string_options", 8, False),
              (_REP, "BoolAttrib", "button_options", 9, False),
              (_REP, "MultipleChoiceOption", "mc_options", 10, False)],
    "MultipleChoiceOption": [(_OPT, "string", "name", 1, False), (_OPT, "string", "value", 2, False),
                             (_REP, "string", "choices", 3, False)],
    "ImagePrototype": [(_OPT, "string", "name", 1, False), (_OPT, "int32", "channels", 2, False)],
    "Error": [(_OPT, "string", "msg", 1, False)],
    "RequestInference": [(_OPT, "Model", "model", 1, False), (_REP, "Image", "images", 2, False)],
    "RespondInference": [(_OPT, "int32", "num_images", 1, False), (_REP, "Image", "images", 2, False),
                         (_OPT, "int32", "num_objects", 3, False),
                         (_REP, "FieldValuePairAttrib", "objects", 4, False)],
    "Image": [(_OPT, "int32", "width", 1, False), (_OPT, "int32", "height", 2, False),
              (_OPT, "int32", "channels", 3, False), (_OPT, "bytes", "image", 4, False)],
    "BoolAttrib": [(_OPT, "string", "name", 1, False), (_REP, "bool", "values", 2, True)],
    "IntAttrib": [(_OPT, "string", "name", 1, False), (_REP, "int32", "values", 2, True)],
    "FloatAttrib": [(_OPT, "string", "name", 1, False), (_REP, "float", "values", 2, True)],
    "StringAttrib": [(_OPT, "string", "name", 1, False), (_REP, "string", "values", 2, False)],
    "FieldValuePairAttrib": [(_OPT, "string", "name", 1, False), (_REP, "FieldValuePair", "values", 2, False)],
    "FieldValuePair": [(_REP, "IntAttrib", "int_attributes", 1, False),
                       (_REP, "FloatAttrib", "float_attributes", 2, False),
                       (_REP, "StringAttrib", "string_attributes", 3, False),
                       (_REP, "FieldValuePairAttrib", "children", 4, False)],
}


def _build() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(name="mlclient_test.proto", package="mlserver", syntax="proto2")
    for msg_name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=msg_name)
        for label, kind, name, number, packed in fields:
            f = msg.field.add(name=name, number=number, label=label)
            if kind in _SCALARS:
                f.type = _SCALARS[kind]
            else:
                f.type = _F.TYPE_MESSAGE
                f.type_name = f".mlserver.{kind}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"mlserver.{name}"))
            for name in _MESSAGES}


MSG = _build()


# --- pixels -------------------------------------------------------------------------------------
def encode_image(pixels: np.ndarray) -> Any:
    """HxWxC top-row-first -> an Image message (planar, bottom row first, float32 LE)."""
    h, w, c = pixels.shape
    flipped = pixels[::-1]
    data = b"".join(np.ascontiguousarray(flipped[:, :, ch], dtype="<f4").tobytes() for ch in range(c))
    return MSG["Image"](width=w, height=h, channels=c, image=data)


def decode_image(image: Any) -> np.ndarray:
    w, h, c = image.width, image.height, image.channels
    flat = np.frombuffer(image.image, dtype="<f4")
    assert flat.size == w * h * c, f"reply image carries {flat.size} values for {w}x{h}x{c}"
    planes = [flat[ch * w * h:(ch + 1) * w * h].reshape(h, w)[::-1] for ch in range(c)]
    return np.stack(planes, axis=2).astype(np.float32)


# --- the wire ------------------------------------------------------------------------------------
def exchange(port: int, payload: bytes, *, timeout: float = 60.0, shutdown_write: bool = False) -> bytes:
    """Send raw bytes, return the raw reply (header included) until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if payload:
            sock.sendall(payload)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def varint(value: int) -> bytes:
    """A protobuf base-128 varint, for hand-built (and deliberately broken) messages."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def infer_concurrently(port: int, model: Any, images: list[np.ndarray], options: list[dict[str, Any]],
                       start_together: bool = False) -> list[Any]:
    """One client thread per image, all at once (as several artists would); their replies in order."""
    import threading

    replies: list[Any] = [None] * len(images)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(images)) if start_together else None

    def client(i: int) -> None:
        try:
            if barrier:
                barrier.wait()
            replies[i] = infer(port, model, [images[i]], **options[i])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return replies


def frame(body: bytes) -> bytes:
    return str(len(body)).zfill(12).encode("ascii") + body


def parse_reply(raw: bytes) -> Any:
    assert len(raw) >= 12, f"reply too short: {raw!r}"
    total = int(raw[:12].decode("ascii"))
    assert total == len(raw), f"reply header says {total} bytes in all, got {len(raw)}"
    reply = MSG["RespondWrapper"]()
    reply.ParseFromString(raw[12:])
    return reply


def call(port: int, request: Any, timeout: float = 60.0) -> Any:
    return parse_reply(exchange(port, frame(request.SerializeToString()), timeout=timeout))


def info(port: int) -> Any:
    request = MSG["RequestWrapper"](info=True)
    request.r1.info = True
    return call(port, request)


def model_from_info(port: int, name: str) -> Any:
    """The Model message as the node keeps it after "Connect" (it sends it back with its values)."""
    for m in info(port).r1.models:
        if m.name == name:
            return m
    raise KeyError(name)


def inference_request(model: Any, images: list[np.ndarray], **values: Any) -> Any:
    """Like the node: the model from info, with the knob values filled into the matching lists."""
    request = MSG["RequestWrapper"](info=True)
    request.r2.model.CopyFrom(model)
    for attribs in (request.r2.model.bool_options, request.r2.model.int_options,
                    request.r2.model.float_options, request.r2.model.string_options,
                    request.r2.model.button_options):
        for attrib in attribs:
            if attrib.name in values:
                del attrib.values[:]
                attrib.values.append(values[attrib.name])
    for mc in request.r2.model.mc_options:
        if mc.name in values:
            mc.value = values[mc.name]
    for pixels in images:
        request.r2.images.append(encode_image(pixels))
    return request


def infer(port: int, model: Any, images: list[np.ndarray], **values: Any) -> Any:
    return call(port, inference_request(model, images, **values))
