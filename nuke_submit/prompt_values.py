"""SAM 2 prompts as a Nuke prompt node holds them, turned into the farm's prompts.

Pure Python (3.7+). The prompt node (``prompt_node.py``) has, per object slot, a name, a box
(BBox_Knob: left, bottom, right, top) and points (XY_Knob: x, y), each with an on/off switch, all
in Nuke's image coordinates (origin bottom-left, y up). "Set keyframe" stores the slots as they are
on the current frame, converted to the farm's convention (file pixels, origin top-left); the
keyframes are kept on the node as JSON, so they are saved with the script.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Sequence

from mlfarm.prompts import from_nuke_box, from_nuke_point

#: Object slots on a prompt node, and the points each has (positive, positive, negative).
SLOTS = 4
POINTS = (("pos1", 1), ("pos2", 1), ("neg1", 0))


def slot_prompt(frame: int, object_id: int, values: Mapping[str, Any], height: int) -> Dict[str, Any]:
    """One object slot's knob values (``name``, ``use_box``, ``box``, ``use_<point>``, ``<point>``) on
    ``frame`` as a prompt entry, or an empty dict when the slot marks nothing."""
    entry = {"frame": int(frame), "object": int(object_id)}  # type: Dict[str, Any]
    name = str(values.get("name") or "").strip()
    if name:
        entry["name"] = name
    if values.get("use_box"):
        entry["box"] = [round(v, 2) for v in from_nuke_box(*values["box"], height=height)]
    points = []
    for point, label in POINTS:
        if values.get("use_" + point):
            x, y = from_nuke_point(values[point][0], values[point][1], height)
            points.append([round(x, 2), round(y, 2), label])
    if points:
        entry["points"] = points
    return entry if ("box" in entry or points) else {}


def set_keyframe(keys_json: str, frame: int, slots: Sequence[Mapping[str, Any]], height: int) -> str:
    """The node's keyframes with ``frame`` set from ``slots`` (replacing what that frame had)."""
    keys = [k for k in (json.loads(keys_json) if keys_json.strip() else []) if k["frame"] != int(frame)]
    keys += [e for e in (slot_prompt(frame, i + 1, s, height) for i, s in enumerate(slots)) if e]
    return json.dumps(sorted(keys, key=lambda k: (k["frame"], k["object"])))


def keyframes_text(keys_json: str) -> str:
    """What the node shows: each keyframe and the objects marked on it."""
    keys = json.loads(keys_json) if keys_json.strip() else []
    if not keys:
        return "no keyframes yet: place boxes and points, then Set keyframe"
    frames = {}  # type: Dict[int, list]
    for k in keys:
        frames.setdefault(k["frame"], []).append(k.get("name") or "object %d" % k["object"])
    return "\n".join("%d: %s" % (f, ", ".join(names)) for f, names in sorted(frames.items()))
