"""How a chunk's failures read, shared by the pipeline, its runners and the other tasks."""

from __future__ import annotations

from mlfarm.exr.io import FrameError
from mlfarm.models.base import InputError


class WorkerStopping(Exception):
    """A cold shutdown stopped the chunk between batches; its task hands the other frames back."""


def describe_error(exc: BaseException) -> str:
    """A one-line reason for an artist: our own errors speak for themselves, others get their type."""
    text = str(exc).strip()
    if isinstance(exc, (FrameError, OSError, InputError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
