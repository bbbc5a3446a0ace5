"""Frame lists and Nuke-style path patterns.

Pure Python on purpose: Nuke's bundled interpreter (3.7 and up) imports this too, so it must
not pull in numpy, pydantic or anything else heavy, nor use syntax newer than 3.7.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_RANGE_PART = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*(?:[x:]\s*(\d+)\s*)?)?$")
_HASHES = re.compile(r"#+")
_PRINTF = re.compile(r"%(0?)(\d*)d")
_VIEWS = re.compile(r"%[Vv]")


class PatternError(ValueError):
    """A frame pattern or range that cannot be used; the message says why."""


def parse_frames(text: str) -> list[int]:
    """Parse Nuke/Deadline frame lists: ``1001-1100``, ``1001-1100x2``, ``1,5,9-12``.

    Order is kept and duplicates dropped, so ``1-3,2`` is ``[1, 2, 3]``.
    """
    if not str(text).strip():
        raise PatternError("empty frame range")
    frames: list[int] = []
    seen = set()
    for part in str(text).replace(" ", ",").split(","):
        if not part.strip():
            continue
        m = _RANGE_PART.match(part)
        if not m:
            raise PatternError("bad frame range %r: use forms like 1001-1100, 1001-1100x2, 1,3,5" % part.strip())
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        step = int(m.group(3)) if m.group(3) else 1
        if step < 1:
            raise PatternError("bad frame range %r: the step must be at least 1" % part.strip())
        if last < first:
            raise PatternError("bad frame range %r: %d comes after %d" % (part.strip(), first, last))
        for f in range(first, last + 1, step):
            if f not in seen:
                seen.add(f)
                frames.append(f)
    if not frames:
        raise PatternError("empty frame range")
    return frames


def format_frames(frames: Iterable[int]) -> str:
    """The shortest readable form of a frame list, e.g. ``1001-1004,1010`` (parse_frames reads it back)."""
    out: list[str] = []
    run: list[int] = []

    def flush(items: list[int]) -> None:
        if len(items) <= 2:
            out.extend(str(f) for f in items)
        else:
            step = items[1] - items[0]
            out.append("%d-%d" % (items[0], items[-1]) + ("x%d" % step if step != 1 else ""))

    for f in frames:
        if not run or (len(run) == 1 and f > run[0]) or (len(run) > 1 and f - run[-1] == run[1] - run[0]):
            run.append(f)
        elif len(run) == 2 and f > run[1]:
            # A pair that does not continue: its first frame stands alone, its second may start a run.
            flush(run[:1])
            run = [run[1], f]
        else:
            flush(run)
            run = [f]
    flush(run)
    return ",".join(out)


def chunked(frames: Sequence[int], size: int) -> list[list[int]]:
    if size < 1:
        raise PatternError("chunk size must be at least 1")
    return [list(frames[i : i + size]) for i in range(0, len(frames), size)]


def check_pattern(pattern: str) -> None:
    """Refuse patterns the farm cannot expand, with a message an artist can act on."""
    if _VIEWS.search(pattern):
        raise PatternError(
            "%s: stereo view patterns (%%V/%%v) are not supported; render one view per submission" % pattern
        )
    tokens = len(_HASHES.findall(pattern)) + len(_PRINTF.findall(pattern))
    if tokens == 0:
        raise PatternError("%s: no frame number token; use #### or %%04d" % pattern)
    if tokens > 1:
        raise PatternError("%s: more than one frame number token" % pattern)


def frame_path(pattern: str, frame: int) -> str:
    """Expand ``####`` (one # per digit of padding) or ``%04d`` for one frame."""
    check_pattern(pattern)

    def hashes(m: re.Match[str]) -> str:
        return "%0*d" % (len(m.group(0)), frame)

    def printf(m: re.Match[str]) -> str:
        width = int(m.group(2) or 0)
        return "%0*d" % (width, frame) if m.group(1) else "%*d" % (width, frame)

    if _HASHES.search(pattern):
        return _HASHES.sub(hashes, pattern, count=1)
    return _PRINTF.sub(printf, pattern, count=1)


def to_printf(pattern: str) -> str:
    """The same pattern with ``####`` written as ``%04d`` (what Nuke's Read knob prefers)."""
    check_pattern(pattern)
    return _HASHES.sub(lambda m: "%%0%dd" % len(m.group(0)), pattern, count=1)
