"""How models that see time divide a shot: windows of neighbours, and sequences with a direction.

A model declares how it sees time (``BaseModel.temporal``):

- ``frames``: independent frames, chunked and batched (the farm's first kind).
- ``window``: output frame f needs input frames f-k .. f+k (``BaseModel.window`` = k). A chunk reads
  the neighbours it needs, also those outside the submitted frames where they are on disk; a
  neighbour that is not on disk is replaced by the nearest one that is (clamped), so a shot's ends
  and holes are no failures.
- ``sequence``: frames are processed in order, carrying state, from where the prompts are: forward
  from the first prompted frame to the end, backward from it to the start. Each direction is one
  stream of work (two run in parallel), resumed from the last frame it wrote.

Pure functions, shared by the dispatcher (which frames go in which task) and the worker's runners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("frames", "window", "sequence")
FORWARD, BACKWARD = "forward", "backward"
DIRECTIONS = (FORWARD, BACKWARD)


@dataclass(frozen=True)
class Window:
    """What a window model gets for one output frame: the input frames read for it (``frames``: f-k ..
    f+k as read, clamped where missing) and each one's preprocessed item, in the same order."""

    frame: int
    frames: tuple[int, ...]
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Seed:
    """Where a resumed sequence starts: the planes it wrote on the frame before (plane name -> HxWxC
    array) and that frame's preprocessed input."""

    frame: int
    planes: dict[str, Any]
    item: Any


def window_sources(frame: int, k: int, exists: Callable[[int], bool]) -> list[int]:
    """The input frames read for output ``frame``: f-k .. f+k, each missing one replaced by the nearest
    frame towards f that exists (f itself at worst)."""
    out = []
    for offset in range(-k, k + 1):
        f = frame + offset
        step = 1 if offset < 0 else -1
        while f != frame and not exists(f):
            f += step
        out.append(f)
    return out


def window_reads(frames: Iterable[int], k: int, exists: Callable[[int], bool]) -> dict[int, list[int]]:
    """For each output frame, the input frames its window reads (see :func:`window_sources`)."""
    return {f: window_sources(f, k, exists) for f in frames}


def origin(frames: Sequence[int], keyframes: Iterable[int]) -> int:
    """Where a sequence starts: its first prompted frame, or its first frame when it has no prompts."""
    keys = sorted(set(keyframes) & set(frames))
    return keys[0] if keys else min(frames)


def stream_origin(frames: Sequence[int], prompts: Sequence[dict] | None) -> int:
    """Where a sequence job's streams start, from its frames and its prompts' JSON form (``JobSpec``)."""
    return origin(frames, [k["frame"] for k in prompts or ()])


def split(frames: Sequence[int], start: int) -> dict[str, list[int]]:
    """A sequence's frames by direction, each in processing order: forward from ``start`` (included)
    to the end, backward from the frame before it to the beginning. Empty directions are left out."""
    ordered = sorted(set(frames))
    out = {FORWARD: [f for f in ordered if f >= start], BACKWARD: [f for f in reversed(ordered) if f < start]}
    return {d: fs for d, fs in out.items() if fs}


def in_order(direction: str, frames: Iterable[int]) -> list[int]:
    return sorted(frames, reverse=direction == BACKWARD)


def direction_of(frame: int, start: int) -> str:
    return FORWARD if frame >= start else BACKWARD


def resume_point(direction: str, all_frames: Sequence[int], start: int, todo: Iterable[int],
                 done: Callable[[int], bool]) -> tuple[int | None, list[int]]:
    """Where a stream of ``direction`` resumes to render ``todo``: ``(seed, path)``.

    ``seed`` is the nearest frame before ``todo``'s first (in processing order) that was written, so
    its planes re-seed the state; ``None`` means starting from the prompts at ``start``. ``path`` is
    every frame to process from there, in order, up to ``todo``'s last: frames already written on the
    way are processed again (the state passes through them) but not written.
    """
    order = split(all_frames, start).get(direction, [])
    wanted = set(todo)
    positions = [i for i, f in enumerate(order) if f in wanted]
    if not positions:
        return None, []
    first, last = positions[0], positions[-1]
    for i in range(first - 1, -1, -1):
        if done(order[i]):
            return order[i], order[i + 1:last + 1]
    if direction == BACKWARD:  # the backward stream starts from the prompted frame, which forward writes
        return None, [start] + order[:last + 1]
    return None, order[:last + 1]
