"""Finding frames whose chunk message was lost, and queueing them again.

Kombu's Redis transport moves a message from the queue to its "unacked" hash in two steps (BRPOP,
then a write). If Redis goes away between the two, the message is gone: nothing would ever render
those frames and the job would wait forever. mlfarm's job records know better: a frame that is
queued or running, but that no message in any queue or in the unacked hash covers, was lost. Such
frames are checked twice, a few seconds apart (a message between BRPOP and the unacked write is
only invisible for an instant), then reclaimed and enqueued again.

Cheap enough to run every few minutes and after every broker reconnect; see worker/reconciler.py.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator

import redis
from celery import Celery

from mlfarm.settings import Settings

from .celery_app import CHUNK_TASK, PRIORITY_STEPS, QUEUES
from .dispatch import enqueue
from .frames import parse_frames
from .jobs import ACTIVE_JOBS, QUEUED, RUNNING, JobNotFound, JobStore

log = logging.getLogger(__name__)

UNACKED = "unacked"  # kombu's default unacked_key


def queue_keys() -> list[str]:
    """The Redis lists kombu keeps for our queues, one per priority step (``gpu``, ``gpu:3``...)."""
    return [q if step == 0 else f"{q}:{step}" for q in QUEUES for step in PRIORITY_STEPS]


def _chunk_kwargs(raw: str | bytes) -> dict | None:
    """The kwargs of a chunk task message as kombu stores it, or None for anything else."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        if message.get("headers", {}).get("task") != CHUNK_TASK:
            return None
        if message.get("content-type") != "application/json":
            return None  # not ours to read (and never unpickled)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _, kwargs, _ = json.loads(body)
        return kwargs
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _messages(client: redis.Redis) -> Iterator[str]:
    pipe = client.pipeline(transaction=False)
    for key in queue_keys():
        pipe.lrange(key, 0, -1)
    for items in pipe.execute():
        yield from items
    yield from client.hvals(UNACKED)


def covered_frames(client: redis.Redis) -> dict[str, set[int]]:
    """Per job, every frame some chunk message (queued or being worked on) will render."""
    covered: dict[str, set[int]] = defaultdict(set)
    for raw in _messages(client):
        kwargs = _chunk_kwargs(raw)
        if kwargs and "job_id" in kwargs and "frames" in kwargs:
            try:
                covered[kwargs["job_id"]].update(parse_frames(kwargs["frames"]))
            except ValueError:
                continue
    return covered


def find_lost(client: redis.Redis, store: JobStore, grace: float) -> dict[str, list[int]]:
    """Frames queued or running for longer than ``grace`` seconds that no message covers."""
    covered = covered_frames(client)
    now = time.time()
    lost: dict[str, list[int]] = {}
    for job_id in client.smembers(ACTIVE_JOBS):
        try:
            spec = store.spec(job_id)
        except JobNotFound:
            client.srem(ACTIVE_JOBS, job_id)
            continue
        if spec.kind != "render" or store.is_cancelled(job_id):
            continue
        pending = {f: r for f, r in store.frame_records(job_id).items() if r.get("s") in (QUEUED, RUNNING)}
        if not pending:
            client.srem(ACTIVE_JOBS, job_id)
            continue
        stale = [f for f, r in pending.items()
                 if f not in covered.get(job_id, ()) and
                 now - float(r.get("t0") if r.get("s") == RUNNING else r.get("q") or spec.created) > grace]
        if stale:
            lost[job_id] = sorted(stale)
    return lost


def reconcile(app: Celery, settings: Settings, client: redis.Redis, store: JobStore,
              settle: float = 3.0) -> dict[str, list[int]]:
    """Enqueue again every frame lost in two looks ``settle`` seconds apart; returns them per job."""
    first = find_lost(client, store, settings.reconcile_grace)
    if not first:
        return {}
    time.sleep(settle)
    second = find_lost(client, store, settings.reconcile_grace)
    requeued: dict[str, list[int]] = {}
    for job_id, frames in second.items():
        both = sorted(set(frames) & set(first.get(job_id, ())))
        reclaimed = store.reclaim(job_id, both) if both else []
        if reclaimed:
            enqueue(app, settings, store.spec(job_id), reclaimed)
            requeued[job_id] = reclaimed
            log.warning("job %s: frames %s had no chunk message (lost by the broker); queued them again",
                        job_id, ",".join(map(str, reclaimed)))
    return requeued
