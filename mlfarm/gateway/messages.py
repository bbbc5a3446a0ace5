"""The MLClient messages: parsing requests, checking them against a model, building replies.

Checks happen here, at the gateway, before any work is queued: an artist gets a precise error
at once instead of a worker failing later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf.message import DecodeError

from mlfarm.exchange.images import WireImage
from mlfarm.models.options import OptionError, coerce

from . import mlserver_pb2 as pb
from .wire import WireError, split_pixels, varint

log = logging.getLogger(__name__)

#: The object name the MLClient node executes as Python inside Nuke.
PYTHON_SCRIPT = "PythonScript"
_INT32 = (-(2**31), 2**31 - 1)

#: Which list of the request's ``Model`` each of our option types must arrive in.
_OPTION_LISTS = {"bool": "bool_options", "int": "int_options", "float": "float_options",
                 "str": "string_options", "choice": "mc_options", "button": "button_options"}


class RequestError(ValueError):
    """A request the gateway refuses; the message is what the artist reads in Nuke."""


def parse_request(body: bytes | bytearray | memoryview) -> tuple[pb.RequestWrapper, list[memoryview]]:
    """The request without pixels, and each image's pixel bytes (views into ``body``, in order)."""
    request = pb.RequestWrapper()
    try:
        rest, pixels = split_pixels(body)
        request.ParseFromString(rest)
    except (DecodeError, WireError, ValueError) as exc:
        raise RequestError(f"the request is not a valid mlserver.RequestWrapper message ({exc})") from None
    return request, pixels


def error_reply(message: str) -> pb.RespondWrapper:
    reply = pb.RespondWrapper(info=True)
    reply.error.msg = message
    return reply


# --- info -------------------------------------------------------------------------------------
def _model_message(desc: Mapping[str, Any]) -> pb.Model:
    m = pb.Model(name=desc["name"], label=desc.get("label", desc["name"]))
    for name, channels in desc.get("inputs", {}).items():
        m.inputs.add(name=name, channels=int(channels))
    for name, spec in desc.get("outputs", {}).items():
        m.outputs.add(name=name, channels=spec if isinstance(spec, int) else len(spec))
    for opt in desc.get("options", []):
        kind, name, default = opt["type"], opt["name"], opt["default"]
        if kind == "bool":
            m.bool_options.add(name=name, values=[bool(default)])
        elif kind == "int":
            m.int_options.add(name=name, values=[int(default)])
        elif kind == "float":
            m.float_options.add(name=name, values=[float(default)])
        elif kind == "choice":
            m.mc_options.add(name=name, value=str(default), choices=[str(c) for c in opt["choices"]])
        else:
            m.string_options.add(name=name, values=[str(default)])
    for button in desc.get("buttons", []):
        m.button_options.add(name=button["name"], values=[bool(button["default"])])
    return m


def info_reply(descriptions: Mapping[str, Mapping[str, Any]]) -> pb.RespondWrapper:
    reply = pb.RespondWrapper(info=True)
    reply.r1.num_models = len(descriptions)
    for name in sorted(descriptions):
        reply.r1.models.append(_model_message(descriptions[name]))
    return reply


# --- inference requests ---------------------------------------------------------------------
def requested_model(request: pb.RequestWrapper) -> str:
    name = request.r2.model.name if request.r2.HasField("model") else ""
    if not name:
        raise RequestError("the inference request names no model")
    return name


def _given_options(model: pb.Model) -> dict[str, tuple[str, Any]]:
    """name -> (the list it came in, its one value)."""
    given: dict[str, tuple[str, Any]] = {}
    lists: list[tuple[str, Iterable[Any]]] = [
        ("bool_options", model.bool_options), ("int_options", model.int_options),
        ("float_options", model.float_options), ("string_options", model.string_options),
        ("button_options", model.button_options)]
    for list_name, attribs in lists:
        for attrib in attribs:
            if len(attrib.values) != 1:
                raise RequestError(f"option {attrib.name!r} ({list_name}) carries {len(attrib.values)} values; "
                                   "expected exactly one")
            if attrib.name in given:
                raise RequestError(f"option {attrib.name!r} is given twice")
            given[attrib.name] = (list_name, attrib.values[0])
    for mc in model.mc_options:
        if mc.name in given:
            raise RequestError(f"option {mc.name!r} is given twice")
        given[mc.name] = ("mc_options", mc.value)
    return given


def request_options(desc: Mapping[str, Any], model: pb.Model) -> dict[str, Any]:
    """The full, typed option set for this request (defaults for options not sent).

    An option must arrive in the list matching its type (an int knob in ``int_options``...); a
    multiple-choice option may also come as a string, since clients without ``mc_options``
    support can only send it that way.
    """
    specs: dict[str, dict[str, Any]] = {o["name"]: {**o} for o in desc.get("options", [])}
    for b in desc.get("buttons", []):
        specs[b["name"]] = {**b, "button": True}
    options = {name: spec["default"] for name, spec in specs.items()}
    for name, (list_name, value) in _given_options(model).items():
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            raise RequestError(f"model {desc['name']} has no option {name!r} (its options: {known})")
        kind = "button" if spec.get("button") else spec["type"]
        allowed = {_OPTION_LISTS[kind]} | ({"string_options"} if kind == "choice" else set())
        if list_name not in allowed:
            raise RequestError(f"model {desc['name']}: option {name!r} is a {kind} option and must be sent in "
                               f"{_OPTION_LISTS[kind]}, not {list_name}")
        try:
            options[name] = coerce(desc["name"], spec, bool(value) if kind == "button" else value)
        except OptionError as exc:
            raise RequestError(str(exc)) from None
    return options


def request_images(desc: Mapping[str, Any], request: pb.RequestWrapper, pixels: Sequence[memoryview]
                   ) -> list[WireImage]:
    """The request's images, checked against the model's inputs.

    An input declared with N channels accepts 1 to N channels, as the farm's frame reader does:
    the stock MLClient node always sends RGB, also to models that take RGBA.
    """
    inputs = list(desc.get("inputs", {}).items())
    sent = request.r2.images
    if len(sent) != len(inputs):
        names = ", ".join(f"{n} ({c} channels)" for n, c in inputs)
        raise RequestError(f"model {desc['name']} takes {len(inputs)} image(s) ({names}); the request has {len(sent)}")
    images = []
    for (name, channels), msg, data in zip(inputs, sent, pixels):
        img = WireImage(msg.width, msg.height, msg.channels, data)
        img.check(f"image for input {name!r}")
        if img.channels > int(channels):
            raise RequestError(f"model {desc['name']}: input {name!r} takes at most {channels} channels; "
                               f"the image has {img.channels}")
        images.append(img)
    return images


# --- inference replies --------------------------------------------------------------------------
def _attribute(pair: pb.FieldValuePair, name: str, value: Any) -> None:
    values = value if isinstance(value, list) else [value]
    if all(isinstance(v, bool | int) and _INT32[0] <= int(v) <= _INT32[1] for v in values):
        pair.int_attributes.add(name=name, values=[int(v) for v in values])
    elif all(isinstance(v, int | float) for v in values):
        pair.float_attributes.add(name=name, values=[float(v) for v in values])
    else:
        pair.string_attributes.add(name=name, values=[v if isinstance(v, str) else str(v) for v in values])


def _pair(value: Mapping[str, Any]) -> pb.FieldValuePair:
    pair = pb.FieldValuePair()
    for key, v in value.items():
        if v is None:
            continue
        if isinstance(v, dict):
            pair.children.append(_object(str(key), v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            pair.children.append(_object(str(key), v))
        else:
            _attribute(pair, str(key), v)
    return pair


def _object(name: str, value: Any) -> pb.FieldValuePairAttrib:
    """A JSON value as the protocol's object: a dict is one field/value pair, a list of dicts
    several, anything else a single attribute named after the object."""
    obj = pb.FieldValuePairAttrib(name=name)
    if isinstance(value, dict):
        obj.values.append(_pair(value))
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        obj.values.extend(_pair(x) for x in value)
    else:
        obj.values.append(_pair({name: value}))
    return obj


def inference_reply(model: str, images: Sequence[WireImage], objects: Sequence[Any],
                    script_models: Iterable[str]) -> list[bytes | bytearray | memoryview]:
    """The serialized ``RespondWrapper`` for a result, as pieces to send one after another.

    Each key of a dict the model returned becomes one object. ``PythonScript`` objects are
    executed by the node inside Nuke, so they are forwarded only from models on the allow-list
    (``MLFARM_GATEWAY_SCRIPT_MODELS``); from others they are dropped with a warning in the log.

    The pixel bytes are framed by hand rather than copied into a message: a 1080p frame would
    otherwise be copied three more times (into the message, out of it, into one buffer). The
    framing is plain protobuf wire format: length-delimited ``Image`` entries of field 2 of
    ``RespondInference``, itself field 3 of ``RespondWrapper``.
    """
    allowed = model in set(script_models)
    rest = pb.RespondInference(num_images=len(images))
    for item in objects:
        named = item.items() if isinstance(item, dict) else [("result", item)]
        for name, value in named:
            if str(name).lower() == PYTHON_SCRIPT.lower() and not allowed:
                log.warning("dropped a %s object from model %s: it is not in MLFARM_GATEWAY_SCRIPT_MODELS",
                            PYTHON_SCRIPT, model)
                continue
            rest.objects.append(_object(str(name), value))
    rest.num_objects = len(rest.objects)
    pieces: list[bytes | bytearray | memoryview] = []
    r2_length = 0
    for img in images:
        head = pb.Image(width=img.width, height=img.height, channels=img.channels).SerializeToString()
        head += b"\x22" + varint(len(img.data))  # field 4 (image), length-delimited
        entry = b"\x12" + varint(len(head) + len(img.data)) + head  # RespondInference field 2 (images)
        pieces += [entry, img.data]
        r2_length += len(entry) + len(img.data)
    small = rest.SerializeToString()
    r2_length += len(small)
    wrapper = pb.RespondWrapper(info=True).SerializeToString() + b"\x1a" + varint(r2_length)  # field 3 (r2)
    return [wrapper + small, *pieces]
