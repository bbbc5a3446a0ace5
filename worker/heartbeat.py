"""Beating while a long piece of work holds the thread: one helper for every heartbeat a worker keeps."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import redis

log = logging.getLogger(__name__)


@contextlib.contextmanager
def beating(beat: Callable[[], None], interval: float, what: str) -> Iterator[None]:
    """Call ``beat`` every ``interval`` seconds on a daemon thread until the block ends.

    A thread, so it beats while the model or trainer holds this one; a daemon, so it dies with the
    process, which is the point: a heartbeat that stops says the worker is gone. A failed beat is
    logged and the next one tries again; the work itself goes on.
    """
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            try:
                beat()
            except redis.RedisError as exc:
                log.warning("%s: heartbeat failed: %s", what, exc)

    thread = threading.Thread(target=run, name=f"mlfarm-heartbeat-{what}"[:60], daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
