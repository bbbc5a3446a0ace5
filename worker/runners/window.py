"""The ``window`` runner: frame f gets input frames f-k .. f+k (``model.window`` = k).

Each input frame is read (and preprocessed) once, however many windows hold it, and dropped once
no window left in the chunk needs it. Neighbours outside the submitted frames are read for context
where they are on disk; a neighbour that is not on disk is replaced by the nearest that is
(``mlfarm.temporal.window_sources``). A neighbour that exists but cannot be read fails the frames
that need it, naming it.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import Future
from typing import Any

from mlfarm.exr.io import FrameError
from mlfarm.frames import frame_path
from mlfarm.temporal import Window, window_reads

from ..errors import describe_error
from .batches import pump, reader_for


def run(chunk: Any, model: Any, todo: list[int]) -> None:
    k = max(0, int(model.window))
    sources = window_reads(todo, k, lambda f: os.path.isfile(frame_path(chunk.spec.input, f)))
    needed = Counter(s for f in todo for s in sources[f])
    reader = reader_for(chunk, todo)
    channels = chunk.channels(model)
    reads: dict[int, Future[Any]] = {}

    def prefetch(frame: int) -> None:
        for s in sources[frame]:
            if s not in reads:
                reads[s] = reader.submit(chunk._read, s, channels, model)

    def resolve(frame: int) -> Window:
        items = []
        try:
            for s in sources[frame]:
                try:
                    items.append(reads[s].result())
                except Exception as exc:
                    if s == frame:
                        raise
                    raise FrameError(f"its neighbour, frame {s}, cannot be read: {describe_error(exc)}") from None
        finally:
            for s in sources[frame]:  # drop what no window left in the chunk reads
                needed[s] -= 1
                if needed[s] == 0:
                    reads.pop(s, None)
        return Window(frame=frame, frames=tuple(sources[frame]), items=tuple(items))

    pump(chunk, model, todo, prefetch, resolve)
