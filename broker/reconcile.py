"""Finding frames whose chunk message was lost, and queueing them again.

Kombu's Redis transport moves a message from the queue to its "unacked" hash in two steps (BRPOP,
then a write). If Redis goes away between the two, the message is gone: nothing would ever render
those frames and the job would wait forever. mlfarm's job records know better: a frame that is
queued or running, but that no message in any queue or in the unacked hash covers, was lost. Such
frames are checked twice, a few seconds apart (a message between BRPOP and the unacked write is
only invisible for an instant), then reclaimed and enqueued again.

A message in the unacked hash covers its frames only while a living worker holds it (each
consumer reports what it holds, broker/liveness.py). A worker whose broker connection breaks drops
the messages it had taken but not started yet, and with Redis down kombu cannot put them back; a
worker killed outright drops them too. Either way they would sit there until the visibility timeout
(an hour), with their frames queued.

Training jobs too: their epochs are covered by the job's one training task, wherever it is.

Also frames still "running" on a worker that has died (``requeue_orphans``, broker/liveness.py).

Cheap enough to run every few minutes and after every broker reconnect; see worker/reconciler.py.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import NamedTuple, TypeVar

import redis
from celery import Celery

from mlfarm.frames import parse_frames
from mlfarm.settings import Settings
from mlfarm.temporal import direction_of, stream_origin

from .celery_app import CHUNK_TASK, PRIORITY_STEPS, QUEUES, TRAIN_TASK
from .dependencies import release
from .dispatch import feed
from .jobs import ACTIVE_JOBS, HELD, QUEUED, RUNNING, WAITING, JobNotFound, JobStore
from .liveness import Holdings, dead, holdings
from .requirements import requirement_queues

log = logging.getLogger(__name__)

UNACKED = "unacked"  # kombu's default unacked_key
UNACKED_INDEX = "unacked_index"  # kombu's default unacked_index_key: when each message was taken


def queue_keys(client: redis.Redis | None = None) -> list[str]:
    """The Redis lists kombu keeps for our queues, one per priority step (``gpu``, ``gpu:3``...); with
    ``client``, those of the requirement queues in use too (``gpu@80gb``, broker/requirements.py)."""
    queues = list(QUEUES) + (requirement_queues(client) if client is not None else [])
    return [q if step == 0 else f"{q}:{step}" for q in queues for step in PRIORITY_STEPS]


class TaskMessage(NamedTuple):
    task: str
    id: str
    kwargs: dict


def parse_message(raw: str | bytes) -> TaskMessage | None:
    """A chunk or training message as kombu stores it, else None."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        headers = message.get("headers", {})
        if headers.get("task") not in (CHUNK_TASK, TRAIN_TASK):
            return None
        if message.get("content-type") != "application/json":
            return None  # not ours to read (and never unpickled)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _, kwargs, _ = json.loads(body)
        return TaskMessage(headers["task"], headers.get("id", ""), kwargs)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass
class Coverage:
    """What the messages in the broker (queued, or unacked: being worked on) will still render.

    A message in kombu's unacknowledged hash that no living consumer holds (broker/liveness.py)
    renders nothing: its frames that no worker started are not covered. Those a worker started are
    left to ``requeue_orphans``, which knows whether that worker died and marks them interrupted."""

    frames: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # chunk tasks
    whole_jobs: set[str] = field(default_factory=set)  # a training task covers every epoch left
    unheld_frames: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    unheld_jobs: set[str] = field(default_factory=set)
    #: A sequence task covers its whole stream (job, direction): it queues the next segment itself.
    streams: set[tuple[str, str]] = field(default_factory=set)
    unheld_streams: set[tuple[str, str]] = field(default_factory=set)

    def add(self, message: TaskMessage, held: bool) -> None:
        job_id = message.kwargs.get("job_id")
        if not isinstance(job_id, str):
            return
        if message.task == TRAIN_TASK:
            (self.whole_jobs if held else self.unheld_jobs).add(job_id)
            return
        direction = message.kwargs.get("direction")
        if isinstance(direction, str):
            (self.streams if held else self.unheld_streams).add((job_id, direction))
        try:
            frames = parse_frames(message.kwargs.get("frames", ""))
        except ValueError:
            return
        (self.frames if held else self.unheld_frames)[job_id].update(frames)

    def covers(self, job_id: str, frame: int, state: str, direction: str | None = None) -> bool:
        """``direction``: the frame's stream, for a sequence job."""
        if job_id in self.whole_jobs or frame in self.frames.get(job_id, ()) or (job_id, direction) in self.streams:
            return True
        return state == RUNNING and (job_id in self.unheld_jobs or frame in self.unheld_frames.get(job_id, ())
                                     or (job_id, direction) in self.unheld_streams)


def coverage(client: redis.Redis, holders: Holdings | None = None) -> Coverage:
    """``holders``: what the living consumers hold; None counts every unacknowledged message as held
    (right after a broker outage, when the living have not reported again yet)."""
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(client):
        pipe.lrange(key, 0, -1)
    pipe.hgetall(UNACKED)
    pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    *queued, unacked, index = pipe.execute()
    taken_at = dict(index)
    now = time.time()
    cov = Coverage()
    for raw in chain.from_iterable(queued):
        message = parse_message(raw)
        if message:
            cov.add(message, held=True)
    for tag, raw in unacked.items():
        message = parse_message(raw)
        if message:
            cov.add(message, held=holders is None or holders.may_hold(message.id, taken_at.get(tag, now)))
    return cov


def find_lost(client: redis.Redis, store: JobStore, grace: float, holders: Holdings | None = None
              ) -> dict[str, list[int]]:
    """Frames queued or running for longer than ``grace`` seconds that no message covers."""
    cov = coverage(client, holders)
    now = time.time()
    lost: dict[str, list[int]] = {}
    for job_id in client.smembers(ACTIVE_JOBS):
        try:
            spec = store.spec(job_id)
        except JobNotFound:
            client.srem(ACTIVE_JOBS, job_id)
            continue
        if store.is_cancelled(job_id):
            continue
        records = store.frame_records(job_id)
        # Unsent frames (``u``) have no message on purpose: the job's next feed sends them.
        pending = {f: r for f, r in records.items() if r.get("s") in (QUEUED, RUNNING) and not r.get("u")}
        if not pending:
            if not any(r.get("s") in (QUEUED, WAITING, HELD) for r in records.values()):
                client.srem(ACTIVE_JOBS, job_id)  # nothing left to send, release or resume
            continue
        start = stream_origin(spec.frames, spec.prompts) if spec.temporal == "sequence" else None
        stale = [f for f, r in pending.items()
                 if not cov.covers(job_id, f, r["s"], direction_of(f, start) if start is not None else None) and
                 now - float(r.get("t0") if r["s"] == RUNNING else r.get("q") or spec.created) > grace]
        if stale:
            lost[job_id] = sorted(stale)
    return lost


K = TypeVar("K")


def _seen_twice(find: Callable[[], dict[K, list[int]]], settle: float) -> dict[K, list[int]]:
    """What ``find`` returns in two looks ``settle`` seconds apart: a frame between two states
    (a message between BRPOP and the unacked write, a heartbeat late by a moment) is not taken."""
    first = find()
    if not first:
        return {}
    time.sleep(settle)
    both = {key: sorted(set(frames) & set(first.get(key, ()))) for key, frames in find().items()}
    return {key: frames for key, frames in both.items() if frames}


def reconcile(app: Celery, settings: Settings, client: redis.Redis, store: JobStore,
              settle: float = 3.0, judge_holders: bool = True) -> dict[str, list[int]]:
    """Enqueue again every frame lost in two looks ``settle`` seconds apart; returns them per job.
    ``judge_holders``: whether the consumers' reports of what they hold can be trusted, i.e. not
    within MLFARM_WORKER_DEAD_AFTER of a broker outage (worker/reconciler.py)."""
    def find() -> dict[str, list[int]]:
        return find_lost(client, store, settings.reconcile_grace, holdings(client) if judge_holders else None)

    requeued: dict[str, list[int]] = {}
    for job_id, frames in _seen_twice(find, settle).items():
        reclaimed = store.reclaim(job_id, frames)
        if reclaimed:
            feed(app, settings, store, store.spec(job_id))
            requeued[job_id] = reclaimed
            log.warning("job %s: frames %s had no chunk message that a living worker holds (the broker lost "
                        "it, or a worker dropped it unstarted when its broker connection broke or it was "
                        "killed); queued them again", job_id, ",".join(map(str, reclaimed)))
    return requeued


def find_orphans(client: redis.Redis, store: JobStore, dead_after: float) -> dict[tuple[str, str], list[int]]:
    """Frames (a training job's: epochs) running for longer than ``dead_after`` seconds on a worker
    whose heartbeat has expired (broker/liveness.py), per (job, worker)."""
    now = time.time()
    running: dict[tuple[str, str], list[int]] = defaultdict(list)
    for job_id in client.smembers(ACTIVE_JOBS):
        for frame, rec in store.frame_records(job_id).items():
            if rec.get("s") == RUNNING and rec.get("w") and now - float(rec.get("t0") or 0) > dead_after:
                running[(job_id, rec["w"])].append(frame)
    gone = dead(client, {worker for _, worker in running})
    return {key: sorted(frames) for key, frames in running.items() if key[1] in gone}


def requeue_orphans(app: Celery, settings: Settings, client: redis.Redis, store: JobStore,
                    settle: float = 3.0) -> dict[str, list[int]]:
    """Enqueue again the frames of workers that died while rendering them; returns them per job.

    Their chunk is still unacknowledged in the broker, which would redeliver it only after
    ``MLFARM_VISIBILITY_TIMEOUT``; by then its frames are done and the redelivery skips them. The
    frames are marked interrupted, so their new chunk runs alone like a redelivered one. A training
    job gets a new training task, which resumes from the newest checkpoint once the dead trainer's
    lease has run out (its late redelivery finds the run done, or alive and is dropped)."""
    requeued: dict[str, list[int]] = defaultdict(list)
    found = _seen_twice(lambda: find_orphans(client, store, settings.worker_dead_after), settle)
    for (job_id, worker), frames in found.items():
        reclaimed = store.reclaim(job_id, frames, dead_worker=worker)
        if reclaimed:
            feed(app, settings, store, store.spec(job_id))
            requeued[job_id] += reclaimed
            log.warning("job %s: frames %s were running on worker %s, which has sent no heartbeat for %ss "
                        "(killed, out of memory, or its host is gone); queued them again", job_id,
                        ",".join(map(str, reclaimed)), worker, settings.worker_dead_after)
    return dict(requeued)


def keep_moving(app: Celery, settings: Settings, store: JobStore, client: redis.Redis,
                recount: bool = False) -> dict[str, int]:
    """Release what waits on jobs now done and send what fits each job's share: what workers do as
    chunks end (worker/scheduling.py), done again for every active job in case one was missed (Redis
    away as a chunk ended, a worker killed between recording a frame and releasing its dependents).
    ``recount``: first recount each job's frames in flight from its records (a full pass, now and
    then). Returns the tasks sent per job."""
    sent: dict[str, int] = {}
    for job_id in client.smembers(ACTIVE_JOBS):
        try:
            spec = store.spec(job_id)
        except JobNotFound:
            continue
        if recount:
            store.recount(job_id)
        if spec.after or spec.after_frames:
            release(app, settings, store, spec)
        n = feed(app, settings, store, spec)
        if n:
            sent[job_id] = n
    return sent
