"""*ML Farm > Segment objects (SAM 2)...*: a prompt node the artist edits in the Viewer.

A NoOp after the selected node, with an "ML Farm prompts" tab: per object slot a name, a box and
points (positive, positive, negative), each switched on or off, which Nuke draws as handles in the
Viewer while the node's panel is open. "Set keyframe" stores the slots on the current frame (more
keyframes correct an object from there on); "Submit..." opens the submit panel for the node above
with SAM 2 chosen and the keyframes as the job's prompts. The decisions are in ``prompt_values.py``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import nuke

from .plan import PlanError
from .prompt_values import POINTS, SLOTS, keyframes_text, set_keyframe

KEYS_KNOB = "mlfarm_keyframes"
SUMMARY_KNOB = "mlfarm_keyframes_text"


def _knob(prefix: str, slot: int, what: str) -> str:
    return "%s%d_%s" % (prefix, slot, what)


def create_prompt_node(source: Any) -> Any:
    """The prompt node for ``source``, placed below it, boxes and points in its frame's middle."""
    node = nuke.nodes.NoOp()
    node.setInput(0, source)
    node.setName("ML_prompts")
    node.setXYpos(source.xpos(), source.ypos() + 120)
    width, height = source.width() or 1920, source.height() or 1080
    node.addKnob(nuke.Tab_Knob("mlfarm_prompts", "ML Farm prompts"))
    for slot in range(1, SLOTS + 1):
        name = nuke.String_Knob(_knob("obj", slot, "name"), "object %d name" % slot)
        node.addKnob(name)
        use_box = nuke.Boolean_Knob(_knob("obj", slot, "use_box"), "box")
        node.addKnob(use_box)
        box = nuke.BBox_Knob(_knob("obj", slot, "box"), "box")
        node.addKnob(box)
        box.setValue([width * 0.4, height * 0.4, width * 0.6, height * 0.6])
        for point, label in POINTS:
            use = nuke.Boolean_Knob(_knob("obj", slot, "use_" + point), ("+" if label else "-") + " point")
            node.addKnob(use)
            xy = nuke.XY_Knob(_knob("obj", slot, point), point)
            node.addKnob(xy)
            xy.setValue([width * 0.5, height * 0.5])
        use_box.setValue(slot == 1)
    node.addKnob(nuke.Multiline_Eval_String_Knob(KEYS_KNOB, "keyframes (JSON)"))
    node.addKnob(nuke.Text_Knob(SUMMARY_KNOB, "keyframes", keyframes_text("")))
    call = "import mlfarm.nuke_submit.prompt_node as p; p.%s(nuke.thisNode())"
    node.addKnob(nuke.PyScript_Knob("mlfarm_set_key", "Set keyframe", call % "set_keyframe_command"))
    node.addKnob(nuke.PyScript_Knob("mlfarm_clear_keys", "Clear keyframes", call % "clear_keyframes_command"))
    node.addKnob(nuke.PyScript_Knob("mlfarm_submit_prompts", "Submit...", call % "submit_command"))
    return node


def slots(node: Any) -> List[Dict[str, Any]]:
    """Every slot's knob values, as ``prompt_values`` takes them."""
    out = []
    for slot in range(1, SLOTS + 1):
        values = {"name": node[_knob("obj", slot, "name")].value(),
                  "use_box": bool(node[_knob("obj", slot, "use_box")].value()),
                  "box": list(node[_knob("obj", slot, "box")].value())}
        for point, _ in POINTS:
            values["use_" + point] = bool(node[_knob("obj", slot, "use_" + point)].value())
            values[point] = list(node[_knob("obj", slot, point)].value())
        out.append(values)
    return out


def record_keyframe(node: Any, frame: int) -> str:
    """Store the slots as they are now as ``frame``'s prompts; returns the node's keyframes JSON."""
    source = node.input(0)
    if source is None:
        raise PlanError("connect the prompt node to the node to segment")
    keys = set_keyframe(node[KEYS_KNOB].value(), frame, slots(node), source.height())
    node[KEYS_KNOB].setValue(keys)
    node[SUMMARY_KNOB].setValue(keyframes_text(keys))
    return keys


def set_keyframe_command(node: Any) -> None:
    from .nuke_ui import _report

    try:
        record_keyframe(node, int(nuke.frame()))
    except Exception as exc:
        _report(exc)


def clear_keyframes_command(node: Any) -> None:
    node[KEYS_KNOB].setValue("")
    node[SUMMARY_KNOB].setValue(keyframes_text(""))


def submit_command(node: Any) -> None:
    """Open the submit panel for the node above, SAM 2 chosen, these keyframes as the prompts."""
    from .nuke_ui import SubmitPanel, _report, connect

    try:
        if not node[KEYS_KNOB].value().strip():  # nothing recorded yet: the frame the artist is on
            record_keyframe(node, int(nuke.frame()))
        panel = SubmitPanel(node.input(0), connect(), prompts_json=node[KEYS_KNOB].value())
        if panel.showModalDialog():
            panel.submit()
    except Exception as exc:
        _report(exc)


def segment_selected() -> Any:
    """*ML Farm > Segment objects (SAM 2)...*: a prompt node after the selected node, its panel open."""
    try:
        source = nuke.selectedNode()
    except ValueError:
        nuke.message("ML Farm: select the node to segment first")
        return None
    node = create_prompt_node(source)
    node.showControlPanel()
    return node
