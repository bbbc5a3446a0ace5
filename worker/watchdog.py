"""The frame time limit, enforced inside the worker process.

Celery enforces task time limits only in its prefork pool. Chunks run on the solo or threads pool
(models stay loaded and chunks share them), where Celery never stops a task: a frame stuck in a
model, a GPU driver or a hung file system would hold its thread for ever, and with it the worker's
turn for every other job (``worker/sharing.py``). A thread cannot be killed, so when a stage runs
past its limit the watchdog

1. (``on_stop``) stops the worker taking tasks, then sends those still waiting for their turn back
   to the queue;
2. calls the stage's ``on_expire``: the pipeline fails the stuck frames with the reason (they are
   not tried again until someone retries them) and hands the chunk's other frames back;
3. sets the process's ``stop_now``: other chunks stop at their next batch and hand their frames back, as on a
   cold shutdown;
4. ends the process with ``EXIT_HUNG`` once they have, or after ``grace`` seconds, when the tasks
   still running (e.g. a chunk whose batch is queued on the lane behind the stuck one) hand their
   work back through their ``release``. Its supervisor (``mlfarm worker --gpus``, ``mlfarm up``)
   starts a fresh one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: The exit status of a worker that ended itself because a frame outlasted its time limit
#: (EX_TEMPFAIL: start it again).
EXIT_HUNG = 75


@dataclass
class _Watch:
    deadline: float
    what: str
    on_expire: Callable[[], None]


class Watchdog:
    def __init__(self, stop: threading.Event, on_stop: Callable[[], None] = lambda: None, poll: float = 0.25,
                 grace: float = 15.0, exit_process: Callable[[int], None] = os._exit) -> None:
        self.stop = stop
        self.on_stop = on_stop  # e.g. turn away the tasks waiting for their turn
        self.poll = poll
        self.grace = grace
        self.exit_process = exit_process
        self._watches: dict[int, _Watch] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._busy: dict[int, Callable[[], None]] = {}  # tasks running (``busy``), the stuck one included
        self.expired: _Watch | None = None

    @contextlib.contextmanager
    def busy(self, release: Callable[[], None] = lambda: None) -> Iterator[None]:
        """A task, from its start to its last record (hand-backs included): what the process waits
        for before it ends. ``release`` hands its unfinished work back if it is still running when
        the process ends: a chunk whose batch waits on the lane behind the stuck one never gets to
        its next batch to stop there."""
        with self._lock:
            key = next(self._ids)
            self._busy[key] = release
        try:
            yield
        finally:
            with self._lock:
                self._busy.pop(key, None)

    @contextlib.contextmanager
    def watch(self, seconds: float, what: str, on_expire: Callable[[], None]) -> Iterator[None]:
        """Within this block, ``what`` must finish in ``seconds``, or the process ends (see above)."""
        with self._lock:
            key = next(self._ids)
            self._watches[key] = _Watch(time.monotonic() + seconds, what, on_expire)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlfarm-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._watches.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.poll)
            now = time.monotonic()
            with self._lock:
                late = next((w for w in self._watches.values() if w.deadline <= now), None)
            if late is not None:
                self._expire(late)
                return

    def _expire(self, late: _Watch) -> None:
        self.expired = late
        log.critical("%s is past its time limit (MLFARM_FRAME_TIME_LIMIT): the worker fails it and restarts, "
                     "since a stuck thread cannot be stopped", late.what)
        # Taking no more tasks comes first: what on_expire and the stopping chunks hand back goes to
        # the queue, and must not be fetched again by this ending process.
        self.on_stop()
        try:
            late.on_expire()
        except Exception:  # the records may stay "running": the broker redelivers, the reconciler finds them
            log.exception("could not record %s as failed", late.what)
        self.stop.set()
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:  # let the other chunks hand their frames back
            with self._lock:
                if len(self._busy) <= 1:  # only the stuck one
                    break
            time.sleep(self.poll)
        with self._lock:
            still = list(self._busy.values())
        for release in still:  # the stuck one's was done by on_expire; releases are idempotent
            try:
                release()
            except Exception:  # the broker redelivers their chunks, the reconciler finds their frames
                log.exception("could not hand back the work of a task still running")
        time.sleep(1.0)  # Celery's own thread sends the requeues and acknowledgements of those chunks
        logging.shutdown()
        self.exit_process(EXIT_HUNG)
