"""Putting a job's frames on the queue: one Celery task per chunk.

Used by submission, retry and the reconciler, so every path enqueues the same way: readable task
arguments (job, model, frames; never options or pixels), the job's priority, and time limits that
scale with the chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery

from mlfarm.frames import chunked, format_frames
from mlfarm.settings import Settings
from mlfarm.temporal import split, stream_origin

from .celery_app import CHUNK_TASK, celery_priority
from .jobs import JobSpec, JobStore
from .requirements import queue_for


def chunk_kwargsrepr(spec: JobSpec, kwargs: Mapping[str, Any]) -> str:
    """How a chunk reads in Flower and worker logs: its kwargs plus the job's name (shot and node
    when submitted from Nuke) and output pattern (which names the shot in any studio's layout, also
    for a job submitted without a name), so a wrangler can tell whose frames these are. A Python
    literal, so Flower's search takes ``kwargs:job_id=ID``. Never options or pixels."""
    shown = dict(kwargs, name=spec.name) if spec.name else dict(kwargs)
    shown["output"] = spec.output
    if spec.require:  # which workers may take it (its queue says so too: broker/requirements.py)
        shown["require"] = ",".join(spec.require)
    return repr(shown)


#: How jobs of kinds other than frame chunks are queued: ``enqueue(app, settings, spec) -> tasks``,
#: declared as entry points by whoever submits them (training's is ``train``), so the broker needs
#: to know none of them.
JOB_KINDS_GROUP = "mlfarm.job_kinds"


@functools.cache
def job_kind(kind: str) -> Callable[[Celery, Settings, JobSpec], int]:
    """The enqueuer declared for ``kind``; ValueError when nothing installed declares one."""
    try:
        from importlib.metadata import entry_points
    except ImportError:  # Python 3.7 (Nuke 13): the backport kombu installs there
        from importlib_metadata import entry_points
    found = entry_points()
    declared = (found.select(group=JOB_KINDS_GROUP) if hasattr(found, "select")
                else found.get(JOB_KINDS_GROUP, ()))
    for ep in declared:
        if ep.name == kind:
            return ep.load()
    raise ValueError(f"no installed package says how to queue a job of kind {kind!r} ({JOB_KINDS_GROUP})")


def sequence_streams(spec: JobSpec, frames: list[int]) -> list[tuple[str, list[int]]]:
    """A sequence job's ``frames`` as one stream per direction, each the first segment of its frames in
    processing order; the task rendering a segment queues the next (``worker/runners/sequence.py``)."""
    start = stream_origin(spec.frames, spec.prompts)
    wanted = set(frames)
    return [(d, [f for f in fs if f in wanted][:spec.chunk]) for d, fs in split(spec.frames, start).items()
            if wanted.intersection(fs)]


def enqueue(app: Celery, settings: Settings, spec: JobSpec, frames: list[int], generation: int = 0) -> int:
    """Send ``frames`` of ``spec`` as chunk tasks; returns how many tasks were sent.

    A sequence job gets one task per direction (its frames in processing order, the first segment);
    every other job one task per ``spec.chunk`` frames. ``generation``: the job's, as ``JobStore.feed``
    returned it: frames queued again in a later one (a resume) are not this message's to render.
    Callers with frames in the job records send them through ``feed``, which keeps the job within its
    share of the farm; this sends what it is given.
    """
    if spec.kind != "render":
        return job_kind(spec.kind)(app, settings, spec)
    if spec.temporal == "sequence":
        tasks = [(format_frames(sorted(fs)), d, settings.sequence_time_budget)
                 for d, fs in sequence_streams(spec, frames)]
    else:
        tasks = [(format_frames(c), None, settings.chunk_time_limit(len(c))) for c in chunked(frames, spec.chunk)]
    queue = queue_for(spec.queue, spec.require)  # a requirement's own queue: only workers meeting it consume it
    with app.producer_or_acquire() as producer:
        for text, direction, limit in tasks:
            kwargs: dict[str, Any] = {"job_id": spec.id, "model": spec.model, "frames": text}
            if direction is not None:
                kwargs["direction"] = direction
            if generation:
                kwargs["generation"] = generation
            app.send_task(
                CHUNK_TASK,
                kwargs=kwargs,
                kwargsrepr=chunk_kwargsrepr(spec, kwargs),
                queue=queue,
                priority=celery_priority(spec.priority),
                time_limit=limit,
                soft_time_limit=max(1, limit - 30),
                ignore_result=True,  # progress comes from job records: no result to wait for or subscribe to
                producer=producer,
            )
    return len(tasks)


def feed(app: Celery, settings: Settings, store: JobStore, spec: JobSpec) -> int:
    """Send the job's unsent frames that fit its share of the farm; returns how many tasks were sent.

    Every path that queues frames of a job (submit, retry, resume, a released dependency, frames
    handed back, the reconciler) marks them unsent in the records and calls this; so does every
    chunk as it ends. A job thus keeps at most its share in flight (``--max-workers`` chunks, else
    twice the farm's task slots), and jobs of one priority take turns: each chunk that ends puts
    its job's next chunk at the back of the queue, behind the other jobs' (round robin), instead
    of a long shot queueing all its chunks ahead of a later one. A sequence's streams and a
    training run go out whole.
    """
    gen, frames = store.feed(spec, all_at_once=spec.kind != "render" or spec.temporal == "sequence")
    if not frames:
        return 0
    return enqueue(app, settings, spec, frames, generation=gen)
