"""The ``frames`` runner: independent frames, each read once, batched through the model."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from .batches import pump, reader_for


def run(chunk: Any, model: Any, todo: list[int]) -> None:
    reader = reader_for(chunk, todo)
    channels = chunk.channels(model)
    reads: dict[int, Future[Any]] = {}

    def prefetch(frame: int) -> None:
        reads[frame] = reader.submit(chunk._read, frame, channels, model)

    pump(chunk, model, todo, prefetch, lambda frame: reads.pop(frame).result())
