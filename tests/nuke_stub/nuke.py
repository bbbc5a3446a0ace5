"""A small stand-in for Nuke's ``nuke`` module, following Nuke's documented Python API for just
what mlfarm's Nuke layer calls. Tests put this folder on ``sys.path``; nothing else sees it.

It offers only names of Foundry's documented API (``nuke_api.py`` lists them; tests/test_nuke_api.py
checks both this module and mlfarm's Nuke-side code against that list), plus the ``STUB_ONLY``
helpers tests drive it with. The panel class is not here: it is ``nukescripts.PythonPanel``.

What it models, and how faithfully:
- nodes with knobs (``value()/setValue()/getValue()``, ``knob()``, ``node[...]``), ``nuke.nodes.X()``,
  ``createNode``, ``toNode``, ``selectedNode`` (ValueError when nothing is selected, as Nuke does),
  ``allNodes``, ``delete``, ``root()`` with ``first_frame``/``last_frame``, ``filename``;
- typed knobs: ``setValue`` refuses what Nuke refuses (a number on a String_Knob, text on an
  Int_Knob, a choice an Enumeration_Knob does not have);
- node placement: ``xpos/ypos/setXYpos`` and ``screenWidth/screenHeight`` (a Read is taller: it shows a
  thumbnail);
- a Read's timing as Nuke applies it: ``first``/``last`` (the files' frames), ``origfirst``/``origlast``,
  ``frame_mode`` (expression, start at, offset) with ``frame``, and ``before``/``after`` (hold, loop,
  bounce, black) decide which file each output frame shows and the node's ``firstFrame/lastFrame``;
- pixels: a Read reads its EXR frames with OpenImageIO, ``Grade`` multiplies, ``Constant`` is flat,
  and ``execute()`` on a Write writes EXR frames with OpenImageIO;
- threads: knobs may only be touched on the main thread (touching them elsewhere raises, where real
  Nuke would misbehave); ``executeInMainThread`` queues the call until the test runs
  ``process_events()``, like Nuke's event loop would;
- start-up: ``start(nuke_path)`` runs each plugin folder's ``init.py``, then (GUI) its ``menu.py``, as
  Nuke does; an exception there is printed and start-up goes on, as in Nuke;
- ``message``, ``menu``, and ``scriptSaveAs``/``scriptOpen`` to a small JSON file so user knobs survive
  like in a .nk script.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import traceback

import numpy as np
import OpenImageIO as oiio

_MAIN = threading.main_thread()

# --- what tests inspect ---------------------------------------------------------------------------
messages: list[str] = []
printed: list[str] = []  # what tprint wrote to the terminal
executed: list[tuple[str, int, int, int]] = []  # (write node name, first, last, incr)
#: What nukescripts.PythonPanel.showModalDialog() returns: a bool, or a callable given the open panel
#: (the artist's edits while the dialog is up) that returns one.
modal_answer = True
startup_errors: list[str] = []  # tracebacks of init.py/menu.py files that raised during start()
plugin_path: list[str] = []  # folders pluginAddPath added, in order
env = {"gui": True, "NukeVersionMajor": 15}
NUKE_VERSION_MAJOR = 15
NUKE_VERSION_MINOR = 1
STARTLINE = 0x1000

_events: collections.deque = collections.deque()
_nodes: list[Node] = []
_this_node = None


def reset() -> None:
    """A new Nuke session: an empty script, no menus, callbacks or messages."""
    global modal_answer
    scriptClear()
    messages.clear()
    printed.clear()
    startup_errors.clear()
    executed.clear()
    _events.clear()
    _menus.clear()
    _on_script_load.clear()
    modal_answer = True
    env["gui"] = True
    _frame[0] = 1


def scriptClear() -> None:  # noqa: N802
    """An empty script (menus, callbacks and queued events stay, as in Nuke)."""
    global _root, _this_node
    _nodes.clear()
    _root = Root()
    _this_node = None


_on_script_load: list = []


def addOnScriptLoad(call, args=(), kwargs=None, nodeClass="Root") -> None:  # noqa: N802, N803
    _on_script_load.append((call, tuple(args), kwargs or {}))


def removeOnScriptLoad(call, args=(), kwargs=None, nodeClass="Root") -> None:  # noqa: N802, N803
    entry = (call, tuple(args), kwargs or {})
    if entry in _on_script_load:
        _on_script_load.remove(entry)


def process_events(max_calls: int = 10000) -> int:
    """Run the calls queued with executeInMainThread, as Nuke's event loop would; returns how many."""
    _check_thread()
    n = 0
    while _events and n < max_calls:
        call, args, kwargs = _events.popleft()
        call(*args, **kwargs)
        n += 1
    return n


def _check_thread() -> None:
    if threading.current_thread() is not _MAIN:
        raise RuntimeError("nuke stand-in: nodes and knobs may only be touched on the main thread "
                           "(use nuke.executeInMainThread)")


# --- knobs ---------------------------------------------------------------------------------------
class Knob:
    def __init__(self, name: str, label: str | None = None, value: object = ""):
        self._name = name
        self._label = label if label is not None else name
        self._value = value
        self._enabled = True
        self._range = None
        self.node = None

    def name(self) -> str:
        return self._name

    def label(self) -> str:
        return self._label

    def Class(self) -> str:  # noqa: N802 - Nuke's spelling
        return type(self).__name__

    def value(self):
        _check_thread()
        return self._value

    def getValue(self):  # noqa: N802
        _check_thread()
        return self._value

    def setValue(self, value) -> bool:  # noqa: N802
        _check_thread()
        self._value = self._coerce(value)
        return True

    def _coerce(self, value):
        return value

    def setEnabled(self, enabled: bool) -> None:  # noqa: N802
        self._enabled = bool(enabled)

    def enabled(self) -> bool:
        return self._enabled

    def setVisible(self, visible: bool) -> None:  # noqa: N802
        pass

    def setFlag(self, flag: int) -> None:  # noqa: N802
        pass

    def setTooltip(self, text: str) -> None:  # noqa: N802
        self._tooltip = str(text)

    def tooltip(self) -> str:
        return getattr(self, "_tooltip", "")

    def setRange(self, lo: float, hi: float) -> None:  # noqa: N802
        self._range = (lo, hi)

    def _state(self) -> dict:
        return {"cls": type(self).__name__, "label": self._label, "value": self._value}


def _number(knob: Knob, value) -> float:
    """Nuke's number knobs take numbers (bools are ints in Python, as in Nuke); text is a TypeError."""
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"{knob.Class()} {knob.name()}: setValue() takes a number, not {type(value).__name__} {value!r}")


class Int_Knob(Knob):  # noqa: N801 - Nuke's class names
    def __init__(self, name: str, label: str | None = None):
        super().__init__(name, label, 0)

    def _coerce(self, value):
        return int(_number(self, value))


class Double_Knob(Knob):  # noqa: N801
    def __init__(self, name: str, label: str | None = None):
        super().__init__(name, label, 0.0)

    def _coerce(self, value):
        return float(_number(self, value))


class Boolean_Knob(Knob):  # noqa: N801
    def __init__(self, name: str, label: str | None = None, value: bool = False):
        super().__init__(name, label, bool(value))

    def _coerce(self, value):
        return bool(_number(self, value))

    def getValue(self):  # noqa: N802 - Nuke returns 0.0/1.0 here
        return float(super().getValue())


class String_Knob(Knob):  # noqa: N801
    def __init__(self, name: str, label: str | None = None, text: str = ""):
        super().__init__(name, label, text)

    def _coerce(self, value):
        if not isinstance(value, str):
            raise TypeError(f"{self.Class()} {self.name()}: setValue() takes a str, not {type(value).__name__}")
        return value


class File_Knob(String_Knob):  # noqa: N801
    pass


class Text_Knob(String_Knob):  # noqa: N801
    pass


class Tab_Knob(Knob):  # noqa: N801
    def __init__(self, name: str, label: str | None = None):
        super().__init__(name, label, None)


class Enumeration_Knob(Knob):  # noqa: N801
    def __init__(self, name: str, label: str | None, values: list):
        super().__init__(name, label, 0)
        self._values = [str(v) for v in values]

    def values(self) -> list[str]:
        return list(self._values)

    def setValues(self, values: list) -> None:  # noqa: N802
        self._values = [str(v) for v in values]

    def value(self) -> str:
        _check_thread()
        return self._values[self._value] if self._values else ""

    def getValue(self) -> float:  # noqa: N802
        _check_thread()
        return float(self._value)

    def _coerce(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            index = value
        elif str(value) in self._values:
            index = self._values.index(str(value))
        else:
            raise ValueError(f"{self._name}: {value!r} is not one of {self._values}")
        if not 0 <= index < len(self._values):
            raise ValueError(f"{self._name}: index {index} out of range")
        return index

    def _state(self) -> dict:
        return dict(super()._state(), values=self._values)


class _Numbers(Knob):
    """Knobs holding a fixed number of floats (XY_Knob: x, y; BBox_Knob: x, y, r, t)."""

    size = 2

    def __init__(self, name: str, label: str | None = None):
        super().__init__(name, label, [0.0] * self.size)

    def _coerce(self, value):
        values = list(value)
        if len(values) != self.size:
            raise ValueError(f"{self._name}: {self.size} values, not {len(values)}")
        return [float(_number(self, v)) for v in values]

    def value(self):
        _check_thread()
        return list(self._value)


class XY_Knob(_Numbers):  # noqa: N801 - a point, drawn as a handle in the Viewer
    size = 2


class BBox_Knob(_Numbers):  # noqa: N801 - a box (x, y, r, t), drawn as a handle in the Viewer
    size = 4


class Multiline_Eval_String_Knob(String_Knob):  # noqa: N801
    pass


class Script_Knob(Knob):  # noqa: N801
    """A button running a TCL command; nukescripts.PythonPanel's OK and Cancel are these."""

    def __init__(self, name: str, label: str | None = None, command: str = ""):
        super().__init__(name, label, command)


class PyScript_Knob(Knob):  # noqa: N801
    def __init__(self, name: str, label: str | None = None, command: str = ""):
        super().__init__(name, label, command)

    def execute(self) -> None:
        global _this_node
        _check_thread()
        previous, _this_node = _this_node, self.node
        try:
            exec(self._value, {"nuke": __import__("nuke")})
        finally:
            _this_node = previous


class _ReloadButton(Knob):
    """The Read node's built-in *Reload* button; counts presses so tests see reloads."""

    def __init__(self):
        super().__init__("reload", "Reload", None)
        self.presses = 0

    def execute(self) -> None:
        _check_thread()
        self.presses += 1


_KNOB_CLASSES = {c.__name__: c for c in (Int_Knob, Double_Knob, Boolean_Knob, String_Knob, File_Knob, Text_Knob,
                                         Tab_Knob, Enumeration_Knob, PyScript_Knob, Script_Knob, XY_Knob, BBox_Knob,
                                         Multiline_Eval_String_Knob)}


# --- nodes ---------------------------------------------------------------------------------------
class Node:
    _class = "Node"
    _builtin: tuple = ()

    def __init__(self):
        self._knobs: dict[str, Knob] = {}
        self._inputs: dict[int, Node] = {}
        self._xy = [0, 0]
        self._selected = False
        for knob in (String_Knob("name"), String_Knob("label")) + tuple(self._builtin_knobs()):
            self._add(knob)
        self._knobs["name"]._value = _unique_name(self._class)

    def _builtin_knobs(self) -> list[Knob]:
        return []

    def _add(self, knob: Knob) -> None:
        knob.node = self
        self._knobs[knob.name()] = knob

    # identity
    def Class(self) -> str:  # noqa: N802
        return self._class

    def name(self) -> str:
        self._alive()
        return self._knobs["name"]._value

    def setName(self, name: str, uncollide: bool = True) -> None:  # noqa: N802
        _check_thread()
        self._knobs["name"]._value = _unique_name(name) if uncollide else name

    def fullName(self) -> str:  # noqa: N802
        return self.name()

    def _alive(self) -> None:
        if self not in _nodes:
            raise ValueError("PythonObject not attached to a node")

    # knobs
    def knob(self, name: str):
        return self._knobs.get(name)

    def __getitem__(self, name: str) -> Knob:
        self._alive()
        if name not in self._knobs:
            raise NameError(f"knob {name} does not exist")
        return self._knobs[name]

    def knobs(self) -> dict[str, Knob]:
        return dict(self._knobs)

    def addKnob(self, knob: Knob) -> None:  # noqa: N802
        _check_thread()
        self._add(knob)

    def removeKnob(self, knob: Knob) -> None:  # noqa: N802
        self._knobs.pop(knob.name(), None)

    # graph
    def input(self, i: int):
        return self._inputs.get(i)

    def setInput(self, i: int, node) -> bool:  # noqa: N802
        _check_thread()
        if node is None:
            self._inputs.pop(i, None)
        else:
            self._inputs[i] = node
        return True

    def inputs(self) -> int:
        return len(self._inputs)

    def xpos(self) -> int:
        return self._xy[0]

    def ypos(self) -> int:
        return self._xy[1]

    def setXYpos(self, x: int, y: int) -> None:  # noqa: N802
        self._xy = [int(x), int(y)]

    def screenWidth(self) -> int:  # noqa: N802
        return 80

    def width(self) -> int:
        """The image width (its format): the input's, for the stand-in's pass-through nodes."""
        src = self.input(0)
        return src.width() if src is not None else 0

    def height(self) -> int:
        src = self.input(0)
        return src.height() if src is not None else 0

    def showControlPanel(self) -> None:  # noqa: N802
        self.panel_shown = True

    def screenHeight(self) -> int:  # noqa: N802
        return 18

    def setSelected(self, selected: bool) -> None:  # noqa: N802
        self._selected = bool(selected)

    def isSelected(self) -> bool:  # noqa: N802
        return self._selected

    # frames and pixels
    def firstFrame(self) -> int:  # noqa: N802
        src = self.input(0)
        return src.firstFrame() if src is not None else int(_root["first_frame"].value())

    def lastFrame(self) -> int:  # noqa: N802
        src = self.input(0)
        return src.lastFrame() if src is not None else int(_root["last_frame"].value())

    def pixels(self, frame: int) -> np.ndarray:
        """This node's RGBA output for ``frame`` (stand-in only; Nuke computes this itself)."""
        src = self.input(0)
        if src is None:
            raise RuntimeError(f"{self.name()}: no input")
        return src.pixels(frame)

    def channels(self) -> list[str]:
        src = self.input(0)
        return src.channels() if src is not None else ["rgba.red", "rgba.green", "rgba.blue", "rgba.alpha"]


def _unique_name(base: str) -> str:
    taken = {n._knobs["name"]._value for n in _nodes}
    stem = base.rstrip("0123456789") or base
    if base not in taken and base != stem:
        return base
    i = 1
    while f"{stem}{i}" in taken:
        i += 1
    return f"{stem}{i}"


def _channel_name(exr_name: str) -> str:
    main = {"R": "rgba.red", "G": "rgba.green", "B": "rgba.blue", "A": "rgba.alpha"}
    if exr_name in main:
        return main[exr_name]
    return exr_name if "." in exr_name else "other." + exr_name


def _expand(pattern: str, frame: int) -> str:
    from mlfarm.broker.frames import frame_path

    return frame_path(pattern, frame)


class _Read(Node):
    _class = "Read"

    def _builtin_knobs(self) -> list[Knob]:
        first, last = Int_Knob("first"), Int_Knob("last")
        origfirst, origlast = Int_Knob("origfirst"), Int_Knob("origlast")
        for k in (first, last, origfirst, origlast):
            k._value = 1
        on_error = Enumeration_Knob("on_error", "missing frames", ["error", "black", "checkerboard", "nearest frame"])
        colorspace = String_Knob("colorspace", "colorspace", "default")
        frame_mode = Enumeration_Knob("frame_mode", "frame", ["expression", "start at", "offset"])
        outside = ["hold", "loop", "bounce", "black"]
        return [File_Knob("file"), first, last, Enumeration_Knob("before", "before", outside), origfirst, origlast,
                Enumeration_Knob("after", "after", outside), frame_mode, String_Knob("frame", ""),
                Boolean_Knob("raw", "raw data"), colorspace, on_error, _ReloadButton()]

    def screenHeight(self) -> int:  # noqa: N802 - a Read shows a thumbnail
        return 78

    # Nuke's Read timing, written out on its own here (not shared with mlfarm's code under test).
    def _mode(self) -> tuple[str, str, int, int]:
        return (self["frame_mode"].value(), self["frame"].value().strip(), int(self["first"].value()),
                int(self["last"].value()))

    def firstFrame(self) -> int:  # noqa: N802
        mode, text, first, _ = self._mode()
        if mode == "start at":
            return int(float(text or first))
        return first + int(float(text or 0)) if mode == "offset" else first

    def lastFrame(self) -> int:  # noqa: N802
        return self.firstFrame() + int(self["last"].value()) - int(self["first"].value())

    def _file_frame(self, frame: int) -> int | None:
        """The file frame output ``frame`` shows, or None where it is black."""
        mode, text, first, last = self._mode()
        if mode == "start at":
            f = frame - self.firstFrame() + first
        elif mode == "offset":
            f = frame - int(float(text or 0))
        else:  # Nuke evaluates the expression at each frame; these stand-in ones are Python expressions
            f = int(eval(text or "frame", {"__builtins__": {}}, {"frame": frame}))
        if first <= f <= last:
            return f
        rule = self["before" if f < first else "after"].value()
        n = last - first + 1
        if rule == "hold":
            return first if f < first else last
        if rule == "loop":
            return first + (f - first) % n
        if rule == "bounce":
            period = max(1, 2 * n - 2)
            k = (f - first) % period
            return first + (k if k < n else period - k)
        return None

    def _frame_file(self, frame: int) -> str | None:
        f = self._file_frame(frame)
        return None if f is None else _expand(filename(self), f)

    def pixels(self, frame: int) -> np.ndarray:
        path = self._frame_file(frame)
        if path is None:
            return np.zeros_like(self.pixels(self.firstFrame()))
        inp = oiio.ImageInput.open(path)
        if inp is None:
            raise RuntimeError(f"Read {self.name()}: cannot open {path}: {oiio.geterror()}")
        try:
            spec = inp.spec()
            px = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float"), dtype=np.float32)
            names = list(spec.channelnames)
        finally:
            inp.close()
        h, w = px.shape[:2]
        out = np.zeros((h, w, 4), np.float32)
        for i, c in enumerate("RGBA"):
            if c in names:
                out[..., i] = px[..., names.index(c)]
        return out

    def _size(self) -> tuple[int, int]:
        for f in range(self.firstFrame(), self.lastFrame() + 1):
            path = self._frame_file(f)
            if path is not None and os.path.exists(path):
                inp = oiio.ImageInput.open(path)
                spec = inp.spec()
                inp.close()
                return spec.width, spec.height
        return 0, 0

    def width(self) -> int:
        return self._size()[0]

    def height(self) -> int:
        return self._size()[1]

    def channels(self) -> list[str]:
        """Every channel of the file, as Nuke lists them: rgba.red..., then layer.channel."""
        for f in range(self.firstFrame(), self.lastFrame() + 1):
            path = self._frame_file(f)
            if path is not None and os.path.exists(path):
                inp = oiio.ImageInput.open(path)
                names = list(inp.spec().channelnames)
                inp.close()
                return [_channel_name(n) for n in names]
        return []


class _Write(Node):
    _class = "Write"

    def _builtin_knobs(self) -> list[Knob]:
        file_type = Enumeration_Knob("file_type", "file type", [" ", "dpx", "exr", "jpeg", "png", "tiff"])
        datatype = Enumeration_Knob("datatype", "datatype", ["16 bit half", "32 bit float"])
        compression = Enumeration_Knob("compression", "compression", [
            "none", "Zip (1 scanline)", "Zip (16 scanlines)", "RLE", "PIZ Wavelet (32 scanlines)", "PXR24 (lossy)",
            "B44 (lossy)", "B44A (lossy)", "DWAA (lossy)", "DWAB (lossy)"])
        compression._value = 1
        return [File_Knob("file"), file_type, String_Knob("channels", text="rgb"),
                Boolean_Knob("raw", "raw data"), String_Knob("colorspace", text="default"), datatype, compression]

    def _render(self, frame: int) -> None:
        if self["file_type"].value() != "exr":
            raise RuntimeError("stand-in Write renders EXR only, not {!r}".format(self["file_type"].value()))
        names = {"rgba": ("R", "G", "B", "A"), "rgb": ("R", "G", "B"), "alpha": ("A",)}[self["channels"].value()]
        px = self.pixels(frame)
        px = px[..., [("RGBA").index(n) for n in names]]
        path = _expand(filename(self), frame)
        fmt = oiio.FLOAT if self["datatype"].value() == "32 bit float" else oiio.HALF
        spec = oiio.ImageSpec(px.shape[1], px.shape[0], len(names), fmt)
        spec.channelnames = names
        out = oiio.ImageOutput.create(path)
        if out is None or not out.open(path, spec):
            raise RuntimeError(f"Write {self.name()}: cannot write {path}: {oiio.geterror()}")
        out.write_image(np.ascontiguousarray(px))
        out.close()


class _Grade(Node):
    _class = "Grade"

    def _builtin_knobs(self) -> list[Knob]:
        multiply = Double_Knob("multiply")
        multiply._value = 1.0
        return [multiply]

    def pixels(self, frame: int) -> np.ndarray:
        px = super().pixels(frame).copy()
        px[..., :3] *= float(self["multiply"].value())
        return px


class _Constant(Node):
    _class = "Constant"

    def _builtin_knobs(self) -> list[Knob]:
        return [String_Knob("color", text="0.18 0.18 0.18 1"), String_Knob("format", text="32 24")]

    def pixels(self, frame: int) -> np.ndarray:
        w, h = (int(v) for v in self["format"].value().split())
        colour = [float(v) for v in self["color"].value().split()]
        return np.tile(np.asarray(colour, np.float32), (h, w, 1))


class Root(Node):
    _class = "Root"

    def __init__(self):
        super().__init__()
        self._knobs["name"]._value = "Root"

    def _builtin_knobs(self) -> list[Knob]:
        first, last = Int_Knob("first_frame"), Int_Knob("last_frame")
        first._value, last._value = 1, 100
        return [first, last]

    def name(self) -> str:
        """The script's path, or "Root" while the script is unsaved (as Nuke answers)."""
        return self._knobs["name"]._value

    def _alive(self) -> None:
        pass


_NODE_CLASSES = {c._class: c for c in (_Read, _Write, _Grade, _Constant)}
_root = Root()


class _Nodes:
    """``nuke.nodes.Read(file=..., first=...)``: create a node with knob values, not in the panel."""

    def __getattr__(self, cls: str):
        def make(**knobs):
            return _create(cls, knobs)

        return make


nodes = _Nodes()


def _create(cls: str, knobs: dict) -> Node:
    _check_thread()
    node = _NODE_CLASSES.get(cls, type(cls, (Node,), {"_class": cls}))()
    _nodes.append(node)
    for k, v in knobs.items():
        if k == "name":
            node.setName(v)
        else:
            node[k].setValue(v)
    return node


def createNode(node: str, args: str = "", inpanel: bool = True) -> Node:  # noqa: N802
    created = _create(node, {})
    selected = [n for n in _nodes if n.isSelected()]
    if selected:
        created.setInput(0, selected[0])
    for n in _nodes:
        n.setSelected(n is created)
    return created


def toNode(name: str):  # noqa: N802
    for n in _nodes:
        if n._knobs["name"]._value == name:
            return n
    return None


def allNodes(filter: str | None = None, group=None, recurseGroups: bool = False) -> list[Node]:  # noqa: N802, N803, A002
    return [n for n in _nodes if filter is None or n.Class() == filter]


def selectedNode() -> Node:  # noqa: N802
    selected = [n for n in _nodes if n.isSelected()]
    if not selected:
        raise ValueError("no node selected")
    return selected[-1]


def selectedNodes() -> list[Node]:  # noqa: N802
    return [n for n in _nodes if n.isSelected()]


def delete(node: Node) -> None:
    _check_thread()
    _nodes.remove(node)
    for n in _nodes:
        for i, src in list(n._inputs.items()):
            if src is node:
                del n._inputs[i]


def root() -> Root:
    return _root


def thisNode():  # noqa: N802
    return _this_node


def filename(node: Node) -> str:
    """The file knob with expressions evaluated and the frame pattern kept (no expressions here)."""
    return node["file"].value()


def execute(node, start: int, end: int, incr: int = 1, views=None, continueOnError: bool = False) -> None:  # noqa: N803
    _check_thread()
    if isinstance(node, str):
        node = toNode(node)
    if node.Class() != "Write":
        raise RuntimeError(f"execute: {node.name()} is not a Write")
    executed.append((node.name(), int(start), int(end), int(incr)))
    for f in range(int(start), int(end) + 1, int(incr)):
        node._render(f)


_frame = [1]


def frame(f: int | None = None) -> int:
    """The current frame; with ``f``, go to that frame (as the timeline does)."""
    if f is not None:
        _frame[0] = int(f)
    return _frame[0]


def executeInMainThread(call, args=(), kwargs=None) -> None:  # noqa: N802
    if not isinstance(args, tuple):
        args = (args,)
    _events.append((call, args, kwargs or {}))


def message(prompt: str) -> None:
    messages.append(str(prompt))


def tprint(*values) -> None:
    line = " ".join(str(v) for v in values)
    printed.append(line)
    print(line)


def pluginAddPath(path: str, addToSysPath: bool = True) -> None:  # noqa: N802, N803
    """Add a plugin folder at the front of the plugin path (and of sys.path), as Nuke does.

    During ``start()`` the folder's own init.py (and later menu.py) run too, as in Nuke.
    """
    path = os.path.expanduser(str(path))
    if path in plugin_path:
        return
    plugin_path.insert(0, path)
    if addToSysPath:
        sys.path.insert(0, path)
    if _starting is not None:
        _starting.append(path)


_starting: list | None = None


def _run_startup_file(path: str) -> None:
    """Run one init.py/menu.py as Nuke does: a traceback on the terminal, and start-up goes on."""
    try:
        with open(path, encoding="utf-8") as fh:
            code = compile(fh.read(), path, "exec")
        exec(code, {"__file__": path, "__name__": "__main__"})
    except Exception:
        text = traceback.format_exc()
        startup_errors.append(text)
        print(text, file=sys.stderr)


def start(nuke_path: list, gui: bool = True) -> None:
    """Nuke's start-up (stand-in only): every plugin folder's init.py, then in GUI sessions its menu.py.

    The folders are ``~/.nuke`` and NUKE_PATH's (``nuke_path``), plus those that pluginAddPath adds
    while init.py files run. Tracebacks land in ``startup_errors``; what tprint wrote, in ``printed``.
    """
    global _starting
    env["gui"] = bool(gui)
    folders = [os.path.expanduser("~/.nuke")] + [str(p) for p in nuke_path]
    _starting = []
    ran: list[str] = []
    try:
        queue = list(folders)
        while queue:
            folder = queue.pop(0)
            if folder in ran:
                continue
            ran.append(folder)
            if folder not in sys.path:
                sys.path.insert(0, folder)
            init = os.path.join(folder, "init.py")
            if os.path.isfile(init):
                _run_startup_file(init)
            queue.extend(_starting)
            _starting.clear()
    finally:
        _starting = None
    if gui:
        for folder in ran:
            menu_py = os.path.join(folder, "menu.py")
            if os.path.isfile(menu_py):
                _run_startup_file(menu_py)


# --- menus ---------------------------------------------------------------------------------------
class MenuItem:
    def __init__(self, name: str, command=None):
        self._name = name
        self.command = command

    def name(self) -> str:
        return self._name

    def invoke(self):
        return self.command() if callable(self.command) else exec(self.command, {"nuke": __import__("nuke")})


class Menu(MenuItem):
    def __init__(self, name: str):
        super().__init__(name)
        self._items: dict[str, MenuItem] = {}

    def addMenu(self, name: str, **kw) -> Menu:  # noqa: N802
        item = self._items.get(name)
        if not isinstance(item, Menu):
            item = self._items[name] = Menu(name)
        return item

    def addCommand(self, name: str, command=None, shortcut: str = "", icon: str = "", **kw) -> MenuItem:  # noqa: N802
        item = self._items[name] = MenuItem(name, command)
        return item

    def findItem(self, name: str):  # noqa: N802
        head, _, rest = name.partition("/")
        item = self._items.get(head)
        return item.findItem(rest) if rest and isinstance(item, Menu) else item

    def items(self) -> list[MenuItem]:
        return list(self._items.values())


_menus: dict[str, Menu] = {}


def menu(name: str) -> Menu:
    return _menus.setdefault(name, Menu(name))


# --- panels: the class is nukescripts.PythonPanel (nukescripts/ beside this file) -------------------
def user_sets(panel, knob: str, value) -> None:
    """What an artist's edit does: set the knob, then Nuke calls the panel's knobChangedCallback."""
    k = panel.knobs()[knob]
    k.setValue(value)
    panel.knobChangedCallback(k)


# --- scripts -------------------------------------------------------------------------------------
def scriptSaveAs(filename: str, overwrite: int = -1) -> None:  # noqa: N802
    _check_thread()
    doc = {"root": {k: v._value for k, v in _root._knobs.items()}, "nodes": []}
    for n in _nodes:
        doc["nodes"].append({
            "class": n.Class(), "xy": n._xy, "selected": n._selected,
            "inputs": {str(i): src.name() for i, src in n._inputs.items()},
            "knobs": {k: v._state() for k, v in n._knobs.items() if not isinstance(v, _ReloadButton)},
        })
    _root._knobs["name"]._value = filename
    doc["root"]["name"] = filename
    with open(filename, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, ensure_ascii=False)


def scriptSave(filename: str | None = None) -> None:  # noqa: N802
    scriptSaveAs(filename or _root.name())


def scriptOpen(filename: str) -> None:  # noqa: N802
    scriptClear()
    with open(filename, encoding="utf-8") as fh:
        doc = json.load(fh)
    for k, v in doc["root"].items():
        _root._knobs[k]._value = v
    made = []
    for rec in doc["nodes"]:
        node = _NODE_CLASSES.get(rec["class"], type(rec["class"], (Node,), {"_class": rec["class"]}))()
        _nodes.append(node)
        for name, state in rec["knobs"].items():
            knob = node.knob(name)
            if knob is None:
                cls = _KNOB_CLASSES[state["cls"]]
                args = (state["values"],) if cls is Enumeration_Knob else ()
                knob = cls(name, state["label"], *args)
                node._add(knob)
            knob._value = state["value"]
        node._xy = rec["xy"]
        node._selected = rec["selected"]
        made.append((node, rec["inputs"]))
    for node, inputs in made:
        for i, src in inputs.items():
            node._inputs[int(i)] = toNode(src)
    for call, args, kwargs in list(_on_script_load):
        call(*args, **kwargs)
