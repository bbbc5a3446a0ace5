"""The threads a worker renders on: lane threads for models with ``lanes`` > 1, and the I/O pool.

Apart from ``runtime.py`` so the chunk pipeline can use them without importing the process's
runtime (which holds the pipeline's middleware).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from mlfarm.cpus import available_cpus
from mlfarm.exr.io import configure_openexr
from mlfarm.settings import Settings

log = logging.getLogger(__name__)


class LanePools:
    """The lane threads a model with ``lanes`` > 1 runs batches on, kept for the life of the process.

    Kept, not made per chunk, because what a GPU library tunes or compiles may be tied to the
    thread: PyTorch keeps cuDNN's autotuned convolution plans per thread, and lanes made afresh for
    each chunk re-tuned (and recompiled kernels) every chunk, at half the speed of one lane.
    """

    def __init__(self) -> None:
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def get(self, lanes: int) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(lanes)
            if pool is None:
                pool = self._pools[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix=f"mlfarm-lane{lanes}")
            return pool


def io_threads(settings: Settings) -> int:
    """``settings.io_threads``, or with 0 one a core this process may run on (at least two), as
    ``worker/sizing.py`` sizes a GPU worker's: they are niced, so the thread feeding the GPU goes first."""
    return settings.io_threads or max(2, len(available_cpus()))


def _io_thread_start(nice: int) -> None:
    """Each I/O thread (Linux: niceness is per thread) yields the CPU to the GPU-feeding thread."""
    if nice:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError as exc:
            log.warning("could not lower the I/O threads' priority: %s", exc)


def start_io(settings: Settings) -> ThreadPoolExecutor:
    """The worker's I/O threads; OpenEXR's own pool is started from one of them, so its threads
    inherit their priority."""
    pool = ThreadPoolExecutor(io_threads(settings), thread_name_prefix="mlfarm-io", initializer=_io_thread_start,
                              initargs=(settings.io_nice,))
    pool.submit(configure_openexr, settings.exr_threads).result()
    return pool
