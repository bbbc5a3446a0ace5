"""Keeping jobs moving as their chunks end: the job's next chunks, and the jobs that wait on it.

A middleware (``worker/middleware.py``), so the pipeline knows nothing of it: after each frame
recorded done it releases the frames of jobs waiting on that frame (``--after-frames``); after each
chunk it sends the job's next chunks within its share of the farm (``broker/dispatch.py``, feed)
and releases jobs waiting on the whole job (``--after``) once it is done. Nothing here fails a
chunk: what it misses (Redis away a moment), the reconciler's pass catches.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from mlfarm.broker.dependencies import release_dependents
from mlfarm.broker.dispatch import feed
from mlfarm.broker.jobs import JobStore
from mlfarm.settings import Settings

from .middleware import ChunkRun, Middleware

log = logging.getLogger(__name__)


class Scheduling(Middleware):
    def __init__(self, app: Celery, settings: Settings, store: JobStore):
        self.app, self.settings, self.store = app, settings, store

    def after_frame(self, run: ChunkRun, frame: int, error: str | None) -> None:
        if error is not None:
            return
        self._safely("release the frames waiting on it", run, release_dependents, self.app, self.settings, self.store,
                     run.spec.id, [frame])

    def after_chunk(self, run: ChunkRun) -> None:
        self._safely("send its next chunks", run, feed, self.app, self.settings, self.store, run.spec)
        self._safely("release the jobs waiting on it", run, release_dependents, self.app, self.settings, self.store,
                     run.spec.id)

    @staticmethod
    def _safely(what: str, run: ChunkRun, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except redis.RedisError as exc:
            log.warning("job %s: could not %s (%s); the reconciler will", run.spec.id, what, exc)
