"""One runner per way a model sees time (``BaseModel.temporal``), all on ``ChunkRun``'s shared stages.

- ``frames``: independent frames, read ahead, inferred in batches on the lanes, written behind.
- ``window``: the same, with each frame's neighbours read once and handed over as a ``Window``.
- ``sequence``: one stream in order from its seed or prompts, carrying the model's state.

A model never schedules itself: it declares its kind, and the worker picks the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def runner_for(model: Any) -> Callable[[Any, Any, list[int]], None]:
    kind = getattr(model, "temporal", "frames")
    if kind == "frames":
        from .frames import run
    elif kind == "window":
        from .window import run
    elif kind == "sequence":
        from .sequence import run
    else:
        raise ValueError(f"model declares temporal={kind!r}; use frames, window or sequence")
    return run
