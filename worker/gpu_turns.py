"""Whole-GPU turns: batches of a model that fills the GPU by itself run one at a time on each GPU.

Why: a GPU is shared by several worker processes (``MLFARM_WORKERS_PER_GPU``, two by default on
large GPUs), which suits models whose batches leave the GPU half idle (Mask R-CNN, depth): the
processes' kernels fill each other's gaps. RAFT (flow) is the opposite: one batch of frame pairs
keeps the GPU busy and takes most of its memory (about 14 GB a 1080p pair). Two processes running
it side by side time-slice the GPU, and the second measures its batch size against what the first
has cached, so it runs smaller batches: measured on an H100, 0.77x the network's own speed with
two processes against 0.83x with one (docs/benchmarks.md).

A model that says so (``BaseModel.gpu_turns``) runs each ``infer_batch`` inside a turn: a lock per
GPU shared by this host's processes (``flock`` on a file named for the GPU's UUID, in the system's
temporary folder; the kernel lets go of it when a process dies, however it dies) and by this
process's threads. At the end of a turn the batch's GPU work is finished and the memory torch
cached for it is given back, so the next turn, in any process, finds the GPU idle and its memory
free. Reading, preprocessing and writing frames stay outside the turns, so both processes' I/O
threads keep working while one of them has the GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def default_folder() -> Path:
    return Path(tempfile.gettempdir()) / "mlfarm-gpu-turns"


class GpuTurns:
    """The turns of one process: ``turn(key)`` holds GPU ``key`` against this process's other threads
    and every other process using the same ``folder``."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or default_folder()
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Lock] = {}
        self._files: dict[str, int] = {}

    def _for(self, key: str) -> tuple[threading.Lock, int]:
        with self._lock:
            if key not in self._files:
                self.folder.mkdir(parents=True, exist_ok=True)
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
                self._files[key] = os.open(self.folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                self._threads[key] = threading.Lock()
            return self._threads[key], self._files[key]

    @contextlib.contextmanager
    def turn(self, key: str, finish: Callable[[], None] = lambda: None) -> Iterator[None]:
        """The block runs while no other thread or process holds ``key``'s turn; ``finish`` runs at its
        end (also after an exception), still inside the turn."""
        thread_lock, fd = self._for(key)
        with thread_lock:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits without the GIL
            try:
                yield
            finally:
                try:
                    finish()
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)


def cuda_turn(turns: GpuTurns, torch: Any, device: Any) -> contextlib.AbstractContextManager[None]:
    """A turn on the CUDA ``device`` (a torch device or string): keyed by the GPU's UUID, so the
    processes that share a GPU share its turns whatever index ``CUDA_VISIBLE_DEVICES`` gives it; at
    its end the turn's work on the current stream has finished and torch's unused cache is freed."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = f"gpu-{torch.cuda.get_device_properties(index).uuid}"

    def finish() -> None:
        done = torch.cuda.Event(blocking=True)  # wait without spinning or holding the GIL
        done.record(torch.cuda.current_stream(index))
        done.synchronize()
        torch.cuda.empty_cache()

    return turns.turn(key, finish)
