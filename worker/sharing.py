"""Which tasks one worker process runs side by side.

A worker takes a few tasks at once (Celery's threads pool, ``Settings.worker_threads``) so that
one chunk's first reads and last writes overlap the next chunk's GPU work: with chunks of a few
frames a GPU otherwise idles at every chunk boundary. The tasks share the process's models, and
options travel with each chunk (``BaseModel.with_options``), so chunks of one model run together
whatever their options. Every task holds a *key* while it runs (a chunk: its model; an MLClient
frame: a key of its own, since it calls the model outside the lanes; training: a key of its own,
since it takes the whole GPU and sets torch's thread count) and tasks with different keys take
turns: two different models would share the GPU's memory and the lanes they were not sized for.

A chunk whose frames were running on a worker that died runs alone (a key of its own): if one of
them kills this worker too, the chunks beside it would lose an attempt with it for nothing.

First come, first served: a task that waits is not overtaken by later tasks that could have joined
the running ones, so another job's chunk, or an artist's MLClient frame, waits at most for the
tasks already running.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from celery.exceptions import Reject


@dataclass(eq=False)
class _Ticket:
    key: str


class GateClosed(Reject):
    """The process is ending (``TaskGate.close``): a task still waiting for its turn goes back to
    the queue instead (a Celery ``Reject`` with requeue, whichever task it is)."""

    def __init__(self) -> None:
        super().__init__("the worker is ending", requeue=True)


class TaskGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._key: str | None = None  # the key the running tasks hold
        self._running = 0
        self._queue: deque[_Ticket] = deque()  # tasks waiting, in arrival order
        self._closed = False

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Run the block once no task with another key runs or waits ahead of this one."""
        ticket = _Ticket(key)
        with self._cond:
            self._queue.append(ticket)
            try:
                self._cond.wait_for(lambda: self._closed or self._may_start(ticket))
            finally:
                self._queue.remove(ticket)
            if self._closed:
                raise GateClosed()
            self._key = key
            self._running += 1
            self._cond.notify_all()  # tasks with this key queued behind this one may start too
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._key = None
                self._cond.notify_all()

    def _may_start(self, ticket: _Ticket) -> bool:
        if self._running and self._key != ticket.key:
            return False
        for ahead in self._queue:
            if ahead is ticket:
                return True
            if ahead.key != ticket.key:
                return False
        return True

    def close(self) -> None:
        """Turn away every task waiting and every later one (the worker ends: a running task is stuck)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def running(self) -> int:
        with self._cond:
            return self._running


def model_key(model: str) -> str:
    """The key of chunks of ``model``, whatever their options: they run side by side."""
    return f"model {model}"
