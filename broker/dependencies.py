"""Jobs that wait on other jobs: ``--after`` (whole jobs) and ``--after-frames`` (frame by frame).

A dependent job's frames start ``waiting``: nothing of it is sent to Celery. They are released
(queued, then fed: ``dispatch.feed``) when what they wait on is done, by whoever records that:

- ``--after A,B``: every frame, once A and B are both done (every frame done or cached);
- ``--after-frames A``: frame f once frame f of A is done, and its neighbours f-k..f+k of A too
  for a window model of reach k (``JobSpec.after_reach``). Frames A does not have wait for nothing.

Workers release a job's dependents as its frames end (``worker/scheduling.py``); the submission
releases what is already satisfied; the reconciler's pass catches anything missed
(``worker/reconciler.py``). A parent that failed or was cancelled keeps its dependents waiting, and
their status says on which (``JobStatus.waiting_on``); once it is retried and done they go.
"""

from __future__ import annotations

import logging

from celery import Celery

from mlfarm.frames import format_frames
from mlfarm.settings import Settings

from .dispatch import feed
from .jobs import DONE, WAITING, JobNotFound, JobSpec, JobStore

log = logging.getLogger(__name__)


class DependencyError(ValueError):
    """A dependency refused at submit: an unknown job, or one that would wait on itself."""


def check_dependencies(store: JobStore, spec: JobSpec) -> None:
    """Refuse dependencies on unknown jobs and cycles (the new job among its own ancestors)."""
    parents = [*spec.after, *([spec.after_frames] if spec.after_frames else [])]
    for parent in parents:
        if not store.exists(parent):
            raise DependencyError(f"cannot wait on job {parent}: no such job (unknown id, or its record expired)")
    seen: set[str] = set()
    todo = list(parents)
    while todo:
        job = todo.pop()
        if job == spec.id:
            raise DependencyError(f"job {spec.id} would wait on itself (a dependency cycle through "
                                  f"{', '.join(sorted(seen - {spec.id})) or job})")
        if job in seen:
            continue
        seen.add(job)
        try:
            ancestor = store.spec(job)
        except JobNotFound:
            continue
        todo.extend([*ancestor.after, *([ancestor.after_frames] if ancestor.after_frames else [])])


def releasable(store: JobStore, spec: JobSpec, near: list[int] | None = None) -> list[int]:
    """The waiting frames of ``spec`` whose dependencies are done (``near``: only those that frames
    ``near`` of its ``--after-frames`` job can have released, for a check per frame)."""
    records = store.frame_records(spec.id)
    waiting = sorted(f for f, r in records.items() if r.get("s") == WAITING)
    if near is not None and spec.after_frames:
        k = spec.after_reach
        candidates = {g for f in near for g in range(f - k, f + k + 1)}
        waiting = [f for f in waiting if f in candidates]
    if not waiting:
        return []
    for parent in spec.after:
        try:
            if store.in_flight(parent) or store.state(parent) != DONE:  # the first: cheap, on every chunk
                return []
        except JobNotFound:
            return []
    if not spec.after_frames:
        return waiting
    try:
        parent = store.frame_records(spec.after_frames)
    except JobNotFound:
        return []
    if not parent:  # expired
        return []
    k = spec.after_reach
    return [f for f in waiting
            if all(parent[g].get("s") == DONE for g in range(f - k, f + k + 1) if g in parent)]


def release(app: Celery, settings: Settings, store: JobStore, spec: JobSpec,
            near: list[int] | None = None) -> list[int]:
    """Queue ``spec``'s frames whose dependencies are done and send what fits its share; returns them."""
    released = store.release(spec.id, releasable(store, spec, near))
    if released:
        log.info("job %s: frames %s released (what they waited on is done)", spec.id, format_frames(released))
        feed(app, settings, store, spec)
    return released


def release_dependents(app: Celery, settings: Settings, store: JobStore, job_id: str,
                       frames: list[int] | None = None) -> dict[str, list[int]]:
    """After frames of ``job_id`` were recorded done (``frames``; None: the job may have ended),
    release what its dependents can now run. Whole-job dependents are only looked at when the job
    may have ended (a cheap check per frame otherwise)."""
    out: dict[str, list[int]] = {}
    for child in store.dependents(job_id):
        try:
            spec = store.spec(child)
        except JobNotFound:
            continue
        if frames is not None and spec.after_frames != job_id:
            continue  # waits on the whole job: looked at when a chunk of it ends
        released = release(app, settings, store, spec, frames if spec.after_frames == job_id else None)
        if released:
            out[child] = released
    return out
