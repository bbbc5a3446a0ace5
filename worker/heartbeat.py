"""Beating while a long piece of work holds the thread: one helper for every heartbeat a worker keeps."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import redis
from celery.worker import state as worker_state

from mlfarm.broker.liveness import mark_holding

log = logging.getLogger(__name__)


@contextlib.contextmanager
def beating(beat: Callable[[], None], interval: float, what: str, now: bool = False) -> Iterator[None]:
    """Call ``beat`` every ``interval`` seconds (``now``: and at once) on a daemon thread until the
    block ends.

    A thread, so it beats while the model or trainer holds this one; a daemon, so it dies with the
    process, which is the point: a heartbeat that stops says the worker is gone. A failed beat is
    logged and tried again every second until Redis answers (after an outage longer than the beat's
    lifetime, every key has expired: the sooner they are back, the fewer living workers look dead);
    the work itself goes on.
    """
    stop = threading.Event()

    def run() -> None:
        wait = 0.0 if now else interval
        failing = False
        while not stop.wait(wait):
            try:
                beat()
            except redis.RedisError as exc:
                if not failing:  # the first failure of a run of them
                    log.warning("%s: heartbeat failed, trying every second: %s", what, exc)
                failing = True
                wait = min(interval, 1.0)
            else:
                if failing:
                    log.info("%s: heartbeat back", what)
                failing = False
                wait = interval

    thread = threading.Thread(target=run, name=f"mlfarm-heartbeat-{what}"[:60], daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def reporting_holdings(client: redis.Redis, worker: str, dead_after: float,
                       also: Callable[[], None] | None = None) -> Iterator[None]:
    """Report the task messages this process's Celery consumer holds (taken, waiting their turn,
    scheduled or running) every quarter of ``dead_after``: a message no living consumer holds is
    one the reconciler may queue again (broker/liveness.py, broker/reconcile.py). ``also``: called
    on the same beat, after the report (the worker's description, worker/nodes.py)."""
    def beat() -> None:
        at = time.time()  # before reading: a message taken after this may be missing from the copy
        mark_holding(client, worker, worker_state.requests.copy(), dead_after, at)
        if also is not None:
            also()

    with beating(beat, dead_after / 4, "holdings", now=True):
        yield
