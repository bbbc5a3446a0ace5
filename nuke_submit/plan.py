"""Deciding what a submission from Nuke will do, before anything touches the farm or the script.

Pure Python (3.7+) on purpose: everything an artist can get wrong - the frame range, the input
pattern, missing frames, where results go - is decided and checked here, so it is tested without
Nuke, and a refused submission has rendered nothing and queued nothing.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from mlfarm.broker.frames import PatternError, check_pattern, format_frames, frame_path, parse_frames

#: Frame range choices offered by the panel, in menu order.
FRAME_MODES = ("input", "script", "custom")

#: File extensions the farm reads directly from a Read node; anything else is rendered to EXR first,
#: so Nuke's own colour management turns it into scene-linear values the models expect.
DIRECT_EXTENSIONS = (".exr",)

_NUKE_RANGE_SUFFIX = re.compile(r"\s+-?\d+(?:-\s*-?\d+)?\s*$")
_VERSION_SUFFIX = re.compile(r"[_.\-]v\d+$", re.IGNORECASE)
_FRAME_TOKEN = re.compile(r"#+|%0?\d*d")


class PlanError(ValueError):
    """A submission that cannot go ahead; the message says what the artist should change."""


# --- frames ------------------------------------------------------------------------------------
def choose_frames(mode: str, input_range: Tuple[int, int], script_range: Tuple[int, int],
                  custom: str = "") -> List[int]:
    """The frames to submit for the panel's frame-range choice.

    ``input``: the selected node's own range; ``script``: the root's first/last frame;
    ``custom``: a string such as ``1001-1100x2`` or ``1001,1010-1020``.
    """
    if mode == "input":
        first, last = input_range
    elif mode == "script":
        first, last = script_range
    elif mode == "custom":
        try:
            return parse_frames(custom)
        except PatternError as exc:
            raise PlanError(str(exc)) from None
    else:
        raise PlanError("unknown frame range choice %r (use one of: %s)" % (mode, ", ".join(FRAME_MODES)))
    first, last = int(first), int(last)
    if last < first:
        raise PlanError("the %s range %d-%d ends before it starts" % (mode, first, last))
    return list(range(first, last + 1))


def frame_runs(frames: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``(first, last, step)`` runs covering ``frames`` in order: how Nuke's execute() wants them."""
    runs = []  # type: List[Tuple[int, int, int]]
    for part in format_frames(frames).split(","):
        expanded = parse_frames(part)
        step = expanded[1] - expanded[0] if len(expanded) > 1 else 1
        runs.append((expanded[0], expanded[-1], step))
    return runs


# --- a Read's timing ---------------------------------------------------------------------------
#: A Read's knobs that decide which file frame each of its output frames shows.
READ_TIMING_KNOBS = ("first", "last", "frame_mode", "frame", "before", "after")

_FRAME_EXPRESSION = re.compile(r"^frame(?:([+-])(\d+))?$")


@dataclass(frozen=True)
class ReadTiming:
    """How a Read maps its output frames (the timeline) to its files' frame numbers, as Nuke does.

    ``first``/``last`` are the files' frames the Read uses; ``frame_mode`` "start at" shows ``first``
    at output frame ``frame``, "offset" shows file frame f at f + ``frame``, and "expression" shows
    the file frame the expression gives (only ``frame`` plus or minus a number is understood here;
    anything else is ``None`` from :meth:`shift`, and such a Read is rendered by Nuke first).
    ``before``/``after`` say what shows outside first..last: hold, loop, bounce or black.
    """

    first: int
    last: int
    frame_mode: str = "expression"
    frame: str = ""
    before: str = "hold"
    after: str = "hold"

    @classmethod
    def from_knobs(cls, values: Mapping[str, Any]) -> "ReadTiming":
        return cls(first=int(values["first"]), last=int(values["last"]),
                   frame_mode=str(values.get("frame_mode") or "expression"), frame=str(values.get("frame") or ""),
                   before=str(values.get("before") or "hold"), after=str(values.get("after") or "hold"))

    def shift(self) -> Optional[int]:
        """Output frame minus file frame; ``None`` for a frame expression that is not a plain offset."""
        text = self.frame.strip()
        try:
            if self.frame_mode == "start at":
                return int(float(text)) - self.first if text else 0
            if self.frame_mode == "offset":
                return int(float(text)) if text else 0
        except ValueError:
            return None
        if self.frame_mode != "expression":
            return None
        if not text:
            return 0
        match = _FRAME_EXPRESSION.match(text.replace(" ", ""))
        if match is None:
            return None
        amount = int(match.group(2) or 0)
        return -amount if match.group(1) == "+" else amount

    def file_frame(self, frame: int) -> Optional[int]:
        """The file frame output ``frame`` shows, or ``None`` (black, or an expression not understood)."""
        shift = self.shift()
        if shift is None:
            return None
        f = int(frame) - shift
        if self.first <= f <= self.last:
            return f
        rule = self.before if f < self.first else self.after
        n = self.last - self.first + 1
        if rule == "hold":
            return self.first if f < self.first else self.last
        if rule == "loop":
            return self.first + (f - self.first) % n
        if rule == "bounce":
            period = max(1, 2 * n - 2)
            k = (f - self.first) % period
            return self.first + (k if k < n else period - k)
        return None

    def file_frames(self, frames: Iterable[int]) -> List[int]:
        """The distinct file frames that output ``frames`` show, in order (black frames have none)."""
        out = {self.file_frame(f) for f in frames}
        out.discard(None)
        return sorted(out)  # type: ignore[arg-type]

    def for_results(self, frames: Sequence[int]) -> "ReadTiming":
        """The timing of a Read of results numbered like these files, so it lines up with this one.

        The results cover only the submitted ``frames``, so a "start at" becomes the same "offset".
        """
        shift = self.shift() or 0
        mode, text = ("offset", str(shift)) if shift else ("expression", "")
        return ReadTiming(first=min(frames), last=max(frames), frame_mode=mode, frame=text,
                          before=self.before, after=self.after)


# --- placing a node in the graph -----------------------------------------------------------------
#: Space left between a new node and its neighbours, in node-graph units.
PLACE_GAP = 30


def _overlaps(a: Tuple[int, int, int, int], b: Tuple[int, int, int, int], gap: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw + gap and bx < ax + aw + gap and ay < by + bh + gap and by < ay + ah + gap


def place_beside(source: Tuple[int, int, int, int], size: Tuple[int, int],
                 others: Iterable[Tuple[int, int, int, int]], gap: int = PLACE_GAP) -> Tuple[int, int]:
    """Where a new node of ``size`` goes: right of ``source`` (x, y, w, h), level with it, in the first
    column where it overlaps no other node; the next free spot further right otherwise."""
    taken = [tuple(int(v) for v in r) for r in others]
    sx, sy, sw, _ = (int(v) for v in source)
    w, h = int(size[0]), int(size[1])
    x = sx + sw + gap
    for _ in range(10000):
        spot = (x, sy, w, h)
        blocking = [r for r in taken if _overlaps(spot, r, gap)]  # type: ignore[arg-type]
        if not blocking:
            return x, sy
        x = max(r[0] + r[2] for r in blocking) + gap
    return x, sy


# --- input patterns ----------------------------------------------------------------------------
def farm_pattern(nuke_path: str) -> str:
    """The farm's frame pattern for a path as a Read node's file knob holds it.

    Nuke shows sequences as ``plate.####.exr 1001-1100`` and accepts ``####`` and ``%04d``; stereo
    ``%V``/``%v`` patterns are refused with a message, as the farm renders one view per job.
    """
    path = _NUKE_RANGE_SUFFIX.sub("", str(nuke_path).strip()).strip()
    if not path:
        raise PlanError("the node has no file path")
    if not os.path.isabs(path):
        raise PlanError("%s: a relative path; farm workers need an absolute path on shared storage" % path)
    try:
        check_pattern(path)
    except PatternError as exc:
        raise PlanError(str(exc)) from None
    return os.path.normpath(path)


def missing_frames(pattern: str, frames: Iterable[int]) -> List[int]:
    return [f for f in frames if not os.path.isfile(frame_path(pattern, f))]


def check_frames_exist(pattern: str, frames: Sequence[int]) -> None:
    """Refuse a submission whose input frames are not all there, naming the missing ones."""
    missing = missing_frames(pattern, frames)
    if missing:
        raise PlanError("%d of %d input frames are missing: %s (from %s)"
                        % (len(missing), len(frames), format_frames(missing), pattern))


def is_under(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    for root in roots:
        real_root = os.path.realpath(root)
        if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
            return True
    return False


def reads_directly(node_class: str, pattern: str, shared_roots: Iterable[str]) -> bool:
    """Whether the farm can read a node's files itself instead of Nuke rendering them first.

    Only a Read of an EXR sequence that already lies on storage the workers see qualifies; other
    formats go through Nuke so its colour management yields the linear values models expect.
    """
    return (node_class == "Read"
            and os.path.splitext(pattern)[1].lower() in DIRECT_EXTENSIONS
            and is_under(os.path.dirname(pattern), shared_roots))


def write_channels(description: Mapping[str, Any]) -> str:
    """The channels a render-first Write keeps: what the model's first input reads (R, G, B[, A])."""
    inputs = list(description.get("inputs", {}).values())
    return "rgba" if not inputs or int(inputs[0]) >= 4 else "rgb"


# --- names and output folders --------------------------------------------------------------------
def path_component(name: str, fallback: str = "untitled") -> str:
    """A name made safe as one path component; spaces and non-ASCII letters are kept."""
    cleaned = re.sub(r"[\\/:*?\"<>|\x00-\x1f]+", "_", str(name)).strip(" ._")
    return cleaned or fallback


def shot_name(script_path: str, source_pattern: str = "") -> str:
    """A default shot name: the script's name without its version (``sh010_comp_v003.nk`` ->
    ``sh010_comp``), else the source frames' folder, else ``untitled``."""
    if script_path and os.path.basename(script_path) and script_path != "Root":
        stem = os.path.splitext(os.path.basename(script_path))[0]
        return path_component(_VERSION_SUFFIX.sub("", stem))
    if source_pattern:
        return path_component(os.path.basename(os.path.dirname(source_pattern)))
    return "untitled"


def _expand(template: str, root: str, **fields: object) -> str:
    try:
        relative = template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise PlanError("bad output template %r: %s" % (template, exc)) from None
    path = os.path.normpath(os.path.join(root, relative))
    try:
        check_pattern(path)
    except PatternError as exc:
        raise PlanError("output template %r: %s" % (template, exc)) from None
    return path


def _version_taken(pattern: str) -> bool:
    folder = os.path.dirname(pattern)
    prefix = _FRAME_TOKEN.split(os.path.basename(pattern), 1)[0]
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n.startswith(prefix) or n.startswith("." + prefix) for n in names)


def output_pattern(template: str, root: str, shot: str, model: str, version: Optional[int] = None) -> str:
    """The output pattern under the storage root for a shot and model.

    Without ``version`` the first version with no frames on disk is taken, so a new submission never
    mixes its frames with an earlier one's.
    """
    shot, model = path_component(shot), path_component(model)
    if version is not None:
        return _expand(template, root, shot=shot, model=model, version=int(version))
    for candidate in range(1, 10000):
        path = _expand(template, root, shot=shot, model=model, version=candidate)
        if not _version_taken(path):
            return path
        if "{version" not in template:
            return path
    raise PlanError("no free output version under %s" % root)


def reserve_output(pattern: str, job_id: str) -> str:
    """Mark an output version as taken by a job before any of its frames land.

    Without it, a second submission made while the first job is still queued would pick the same
    version and the two jobs would overwrite each other. The marker is a hidden, empty file beside
    the frames (Read nodes ignore it); returns its path.
    """
    folder = os.path.dirname(pattern)
    prefix = _FRAME_TOKEN.split(os.path.basename(pattern), 1)[0]
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, ".%smlfarm-job-%s" % (prefix, job_id))
    with open(marker, "a"):
        pass
    return marker


def render_pattern(template: str, root: str, shot: str, node: str) -> str:
    """Where the render-first path writes a node's frames: a new folder for every submission."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    return _expand(template, root, shot=path_component(shot), node=path_component(node), stamp=stamp)


def masked_url(url: str) -> str:
    """A broker URL fit to show on screen: the password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
