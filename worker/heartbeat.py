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
    logged and tried again every second until Redis answers (after an outage longer than the beat's
    lifetime, every key has expired: the sooner they are back, the fewer living workers look dead);
    the work itself goes on.
    """
    stop = threading.Event()

    def run() -> None:
        wait = interval
        while not stop.wait(wait):
            try:
                beat()
            except redis.RedisError as exc:
                if wait == interval:  # the first failure of a run of them
                    log.warning("%s: heartbeat failed, trying every second: %s", what, exc)
                wait = min(interval, 1.0)
            else:
                if wait != interval:
                    log.info("%s: heartbeat back", what)
                wait = interval

    thread = threading.Thread(target=run, name=f"mlfarm-heartbeat-{what}"[:60], daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
