"""Prompts for promptable models (SAM 2): which objects to follow, marked on which frames.

An artist marks each object once or a few times: positive and negative points and/or a box, on
one or more keyframes, in image pixels with the top-left origin (as the files store rows). Object
ids are 1..N and stay the object's id in every frame's ``instance.id``; a name, when given, is also
the EXR layer of the object's own matte (``<name>.A``), so it must be a layer name Nuke takes.

Pure Python (3.7+): the CLI, the Nuke panel and the workers all parse and check prompts here, so a
bad prompt is refused at submit with the reason, the same reason wherever it was written.

Two spellings, one structure:

- JSON (``--prompt prompts.json``): a list of keyframe prompts, or ``{"prompts": [...]}``::

    [{"frame": 1001, "object": 1, "name": "car", "box": [120, 80, 640, 400]},
     {"frame": 1001, "object": 2, "name": "dog", "points": [[300, 200, 1], [320, 260, 0]]},
     {"frame": 1040, "object": 1, "points": [[500, 210, 1]]}]

  ``points`` are ``[x, y, label]`` with label 1 (on the object) or 0 (not on it); ``box`` is
  ``[x0, y0, x1, y1]``. ``object`` may be left out when ``name`` is given: names get ids in order.
- Inline (``--prompt "1001:car:box=120,80,640,400"``): ``FRAME:NAME`` then ``:box=x0,y0,x1,y1``,
  ``:pos=x,y[;x,y...]`` and ``:neg=x,y[;x,y...]`` parts in any order; the same name in several
  ``--prompt`` arguments is the same object.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A name must be usable as an EXR layer (``<name>.A``) and a Nuke channel: letters, digits, underscore.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

#: Layer names the model's own outputs use: an object may not take them.
RESERVED_NAMES = ("rgba", "rgb", "matte", "instance", "depth", "forward", "backward", "other")


class PromptError(ValueError):
    """A prompt that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True)
class KeyPrompt:
    """What the artist marked for one object on one frame."""

    frame: int
    object_id: int
    points: tuple[Point, ...] = ()
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Prompts:
    """Every object of a job: its id, optional name, and its keyframe prompts in frame order."""

    keys: tuple[KeyPrompt, ...]
    names: dict[int, str] = field(default_factory=dict)

    @property
    def object_ids(self) -> list[int]:
        return sorted({k.object_id for k in self.keys} | set(self.names))

    @property
    def frames(self) -> list[int]:
        return sorted({k.frame for k in self.keys})

    def at(self, frame: int) -> list[KeyPrompt]:
        return [k for k in self.keys if k.frame == frame]

    def to_json(self) -> list[dict[str, Any]]:
        """The JSON form (the list), as stored with the job: canonical, so equal prompts hash equal."""
        out = []
        for k in sorted(self.keys, key=lambda k: (k.frame, k.object_id)):
            entry = {"frame": k.frame, "object": k.object_id}  # type: Dict[str, Any]
            if k.object_id in self.names:
                entry["name"] = self.names[k.object_id]
            if k.points:
                entry["points"] = [[p.x, p.y, 1 if p.positive else 0] for p in k.points]
            if k.box is not None:
                entry["box"] = list(k.box)
            out.append(entry)
        return out


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError("%s: %r is not a number" % (what, value))
    return float(value)


def _check_name(name: str, where: str) -> str:
    if not _NAME.match(name):
        raise PromptError("%s: object name %r must be letters, digits and _ (it becomes the EXR layer %s.A)"
                          % (where, name, name))
    if name.lower() in RESERVED_NAMES:
        raise PromptError("%s: object name %r is taken by one of the model's own planes" % (where, name))
    return name


def _key(entry: Any, where: str, ids_by_name: dict[str, int], names: dict[int, str]) -> KeyPrompt:
    if not isinstance(entry, dict):
        raise PromptError("%s: expected an object with frame, object/name, points and/or box" % where)
    unknown = set(entry) - {"frame", "object", "name", "points", "box"}
    if unknown:
        raise PromptError("%s: unknown field(s) %s" % (where, ", ".join(sorted(unknown))))
    if "frame" not in entry or isinstance(entry["frame"], bool) or not isinstance(entry["frame"], int):
        raise PromptError("%s: needs an integer frame" % where)
    name = entry.get("name")
    if name is not None:
        name = _check_name(str(name), where)
    oid = entry.get("object")
    if oid is None:
        if name is None:
            raise PromptError("%s: needs an object id or a name" % where)
        oid = ids_by_name.get(name) or max(list(ids_by_name.values()) + list(names) + [0]) + 1
    if isinstance(oid, bool) or not isinstance(oid, int) or oid < 1:
        raise PromptError("%s: object ids are whole numbers from 1 (got %r)" % (where, oid))
    if name is not None:
        if names.get(oid, name) != name or ids_by_name.get(name, oid) != oid:
            raise PromptError("%s: object %d is called %r elsewhere; one name per object"
                              % (where, oid, names.get(oid)))
        names[oid], ids_by_name[name] = name, oid
    points = []
    for i, p in enumerate(entry.get("points") or []):
        if not isinstance(p, (list, tuple)) or len(p) != 3 or p[2] not in (0, 1) or isinstance(p[2], bool):
            raise PromptError("%s: point %d must be [x, y, label] with label 1 (on the object) or 0 (not)"
                              % (where, i + 1))
        points.append(Point(_number(p[0], where), _number(p[1], where), p[2] == 1))
    box = entry.get("box")
    if box is not None:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise PromptError("%s: box must be [x0, y0, x1, y1]" % where)
        box = tuple(_number(v, where) for v in box)
        if not (box[0] < box[2] and box[1] < box[3]):
            raise PromptError("%s: box %s must have x0 < x1 and y0 < y1 (top-left, then bottom-right)"
                              % (where, list(box)))
    if not points and box is None:
        raise PromptError("%s: object %d has no points and no box on frame %d" % (where, oid, entry["frame"]))
    return KeyPrompt(frame=entry["frame"], object_id=oid, points=tuple(points), box=box)  # type: ignore[arg-type]


def from_json(data: Any) -> Prompts:
    """Prompts from their JSON form (a list, or ``{"prompts": [...]}``); refused with the reason."""
    if isinstance(data, dict):
        if set(data) != {"prompts"}:
            raise PromptError("a prompts file is a list of prompts, or {\"prompts\": [...]}")
        data = data["prompts"]
    if not isinstance(data, list) or not data:
        raise PromptError("no prompts: mark at least one object with points or a box")
    ids_by_name = {}  # type: Dict[str, int]
    names = {}  # type: Dict[int, str]
    keys = [_key(e, "prompt %d" % (i + 1), ids_by_name, names) for i, e in enumerate(data)]
    seen = set()
    for k in keys:
        if (k.frame, k.object_id) in seen:
            raise PromptError("object %d has two prompts on frame %d: put its points and box in one"
                              % (k.object_id, k.frame))
        seen.add((k.frame, k.object_id))
    return Prompts(keys=tuple(sorted(keys, key=lambda k: (k.frame, k.object_id))), names=names)


def _inline_points(text: str, positive: bool, where: str) -> list[list[float]]:
    out = []
    for pair in text.split(";"):
        xy = pair.split(",")
        if len(xy) != 2:
            raise PromptError("%s: points are x,y;x,y (got %r)" % (where, pair))
        try:
            out.append([float(xy[0]), float(xy[1]), 1 if positive else 0])
        except ValueError:
            raise PromptError("%s: %r is not x,y" % (where, pair)) from None
    return out


def parse_inline(texts: Iterable[str]) -> Prompts:
    """Prompts from ``FRAME:NAME:box=x0,y0,x1,y1[:pos=x,y;...][:neg=x,y;...]`` strings."""
    entries = []
    for text in texts:
        where = "--prompt %r" % text
        parts = text.strip().split(":")
        if len(parts) < 3:
            raise PromptError("%s: expected FRAME:NAME:box=x0,y0,x1,y1 (or pos=x,y / neg=x,y)" % where)
        try:
            frame = int(parts[0])
        except ValueError:
            raise PromptError("%s: %r is not a frame number" % (where, parts[0])) from None
        entry = {"frame": frame, "name": parts[1]}  # type: Dict[str, Any]
        for part in parts[2:]:
            kind, _, values = part.partition("=")
            if kind == "box":
                try:
                    entry["box"] = [float(v) for v in values.split(",")]
                except ValueError:
                    raise PromptError("%s: box=%s is not four numbers" % (where, values)) from None
            elif kind in ("pos", "neg"):
                entry.setdefault("points", []).extend(_inline_points(values, kind == "pos", where))
            else:
                raise PromptError("%s: unknown part %r (use box=, pos=, neg=)" % (where, part))
        entries.append(entry)
    merged = {}  # type: Dict[Tuple[int, str], Dict[str, Any]]
    for e in entries:  # the same object on the same frame, written as two arguments: one prompt
        into = merged.setdefault((e["frame"], e["name"]), {"frame": e["frame"], "name": e["name"]})
        if "box" in e:
            into["box"] = e["box"]
        into.setdefault("points", []).extend(e.get("points", []))
    for e in merged.values():
        if not e["points"]:
            del e["points"]
    return from_json(list(merged.values()))


def check_prompts(prompts: Prompts, frames: Sequence[int], size: tuple[int, int]) -> None:
    """Refuse prompts that cannot be used on this job: a keyframe outside its frames, a point or box
    outside the ``(width, height)`` image."""
    width, height = size
    wanted = set(frames)
    for k in prompts.keys:
        where = "object %d on frame %d" % (k.object_id, k.frame)
        if k.frame not in wanted:
            raise PromptError("%s: frame %d is not one of the job's frames" % (where, k.frame))
        for p in k.points:
            if not (0 <= p.x < width and 0 <= p.y < height):
                raise PromptError("%s: point (%g, %g) is outside the %dx%d image" % (where, p.x, p.y, width, height))
        if k.box is not None:
            x0, y0, x1, y1 = k.box
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise PromptError("%s: box %s is outside the %dx%d image" % (where, [x0, y0, x1, y1], width, height))


def load(arguments: Sequence[str]) -> Prompts:
    """What ``--prompt`` arguments say: one JSON file (path ending .json) or inline prompts."""
    if len(arguments) == 1 and arguments[0].lower().endswith(".json"):
        try:
            with open(arguments[0], encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as exc:
            raise PromptError("cannot read %s: %s" % (arguments[0], exc.strerror or exc)) from None
        except ValueError as exc:
            raise PromptError("%s is not JSON: %s" % (arguments[0], exc)) from None
        return from_json(data)
    return parse_inline(arguments)


# --- Nuke's viewer coordinates --------------------------------------------------------------------
def from_nuke_point(x: float, y: float, height: int) -> tuple[float, float]:
    """A point in Nuke's image coordinates (origin bottom-left, y up) in file pixels (origin top-left,
    rows down): x stays, y becomes ``height - y``."""
    return float(x), float(height) - float(y)


def from_nuke_box(x0: float, y0: float, x1: float, y1: float, height: int) -> tuple[float, float, float, float]:
    """A box as Nuke's Viewer gives it (left, bottom, right, top; y up) as [x0, y0, x1, y1] in file
    pixels (left, top, right, bottom; y down)."""
    left, right = sorted((float(x0), float(x1)))
    bottom, top = sorted((float(y0), float(y1)))
    return left, float(height) - top, right, float(height) - bottom
