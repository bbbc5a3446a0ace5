"""Celery tasks, and the policy that applies to all of them (retries, time limits) in one place."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from mlfarm.broker.celery_app import CHUNK_TASK
from mlfarm.broker.frames import format_frames, parse_frames

from .interactive import register_interactive
from .pipeline import ChunkRun
from .runtime import runtime
from .train_task import register_training

log = logging.getLogger(__name__)

#: Broker/Redis outages are retried with backoff; a frame's own failure is never retried
#: automatically (it is recorded with its reason and retried on request with `mlfarm retry`).
TASK_POLICY: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (redis.ConnectionError, redis.TimeoutError),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 30,
    # Progress lives in the job records; a stored result per chunk would only cost a Redis write.
    # Flower still shows each chunk's outcome, from the worker's events.
    "ignore_result": True,
}


class FramesFailed(Exception):
    """Raised at the end of a chunk with failed frames, so Flower lists the chunk as failed."""


def register_tasks(app: Celery) -> None:
    register_interactive(app, TASK_POLICY)  # issue 3: frames from the MLClient gateway
    register_training(app, TASK_POLICY)  # issue 6: training runs on the train queue

    @app.task(name=CHUNK_TASK, **TASK_POLICY)
    def chunk(self: Any, job_id: str, model: str, frames: str) -> dict[str, Any]:
        """Render ``frames`` (e.g. "1001-1004") of job ``job_id`` with ``model``."""
        rt = runtime()
        run = ChunkRun(spec=rt.spec(job_id), frames=parse_frames(frames), worker=rt.worker,
                       store=rt.store, settings=rt.settings, io=rt.io, middleware=rt.middleware)
        result = run.run(rt.cache)
        if result.failed:
            reasons = "; ".join(result.failed[f] for f in sorted(result.failed))
            raise FramesFailed(f"job {job_id}: {len(result.failed)} of {len(run.frames)} frames failed "
                               f"({format_frames(sorted(result.failed))}): {reasons}")
        return result.to_dict()
