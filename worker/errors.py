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


# --- whose fault a frame's failure is (bad workers, broker/jobs.py) --------------------------------
#: The frame itself: missing, corrupt, unreadable, or refused by the model (``InputError``). Any
#: worker would fail it the same way.
INPUT = "input"
#: Its output: storage unwritable or full, a path outside the storage root, planes that do not fit
#: the layout. Not this worker's doing either.
OUTPUT = "output"
#: This worker: the model raised, would not load or is not ready here, CUDA errors, out of memory,
#: a frame past its time limit. Counted against the worker for the job (MLFARM_BAD_WORKER_FAILURES),
#: and the frame is tried on another worker.
WORKER = "worker"


def device_error(exc: BaseException) -> bool:
    """Out of memory (host or device) or a CUDA/accelerator error, without importing torch."""
    if isinstance(exc, MemoryError):
        return True
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return False
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
                  if isinstance(k, type))
    return bool(kinds) and isinstance(exc, kinds)


def failure_kind(exc: BaseException, stage: str) -> str:
    """``INPUT``, ``OUTPUT`` or ``WORKER`` for ``exc`` raised in ``stage``: ``read`` (reading the
    frame and the model's ``preprocess``), ``write`` (``postprocess`` and writing the EXR), or
    ``model`` (loading, ``infer_batch``, ``step``)."""
    if isinstance(exc, InputError):
        return INPUT
    if device_error(exc):
        return WORKER
    if stage == "read":
        return INPUT
    if stage == "write":
        return OUTPUT if isinstance(exc, (OSError, FrameError)) else WORKER
    return WORKER
