"""Putting a job's frames on the queue: one Celery task per chunk.

Used by submission, retry and the reconciler, so every path enqueues the same way: readable task
arguments (job, model, frames; never options or pixels), the job's priority, and time limits that
scale with the chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery

from mlfarm.settings import Settings

from .celery_app import CHUNK_TASK, celery_priority
from .frames import chunked, format_frames
from .jobs import JobSpec


def chunk_kwargsrepr(spec: JobSpec, kwargs: Mapping[str, Any]) -> str:
    """How a chunk reads in Flower and worker logs: its kwargs plus the job's name (shot and node
    when submitted from Nuke) and output pattern (which names the shot in any studio's layout, also
    for a job submitted without a name), so a wrangler can tell whose frames these are. A Python
    literal, so Flower's search takes ``kwargs:job_id=ID``. Never options or pixels."""
    shown = dict(kwargs, name=spec.name) if spec.name else dict(kwargs)
    shown["output"] = spec.output
    return repr(shown)


def enqueue(app: Celery, settings: Settings, spec: JobSpec, frames: list[int]) -> int:
    """Send ``frames`` of ``spec`` as chunk tasks; returns how many tasks were sent."""
    if spec.kind == "train":  # issue 6: one task trains the epochs left, from the newest checkpoint
        from mlfarm.models.training.submit import enqueue_training

        return enqueue_training(app, settings, spec)
    chunks = chunked(frames, spec.chunk)
    with app.producer_or_acquire() as producer:
        for c in chunks:
            limit = settings.chunk_time_limit(len(c))
            kwargs = {"job_id": spec.id, "model": spec.model, "frames": format_frames(c)}
            app.send_task(
                CHUNK_TASK,
                kwargs=kwargs,
                kwargsrepr=chunk_kwargsrepr(spec, kwargs),
                queue=spec.queue,
                priority=celery_priority(spec.priority),
                time_limit=limit,
                soft_time_limit=max(1, limit - 30),
                ignore_result=True,  # progress comes from job records: no result to wait for or subscribe to
                producer=producer,
            )
    return len(chunks)
