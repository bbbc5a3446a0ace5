"""Which worker processes are alive: a key each one renews, that expires when it stops.

A worker killed outright (SIGKILL, the OOM killer, a host that lost power) acknowledges nothing:
Redis redelivers its chunk only after ``MLFARM_VISIBILITY_TIMEOUT`` (65 min by default, since it must
outlast the longest chunk), and its frames say "running" all that time. Every process that renders
renews ``mlfarm:alive:<worker>`` (the name frame records carry) every quarter of
``MLFARM_WORKER_DEAD_AFTER``; the reconciler (broker/reconcile.py) queues again the running frames
of a worker whose key has expired, within a minute or two instead of an hour.

Each worker's consumer also reports which task messages it holds (``mlfarm:holds:<worker>``):
a message in kombu's unacknowledged hash that no living consumer holds waits for nobody until the
visibility timeout. A worker drops the messages it had taken but not started when its broker
connection breaks (Celery cannot acknowledge them on a new connection, and with Redis down kombu
cannot put them back), and a worker killed outright drops them too. The reconciler
(broker/reconcile.py) queues such messages' frames again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from mlfarm.keys import HOLDS_PREFIX, WORKER_SLOTS, alive_key, holds_key

#: Seconds a consumer may take from kombu's unacknowledged write to registering the message
#: (the same thread, right after): a report older than that may predate the message.
HOLD_MARGIN = 2.0


def mark_alive(client: redis.Redis, worker: str, dead_after: float, slots: int = 1) -> None:
    """Renew ``worker``'s key; ``slots``: the tasks it runs at once, which the farm's share per job
    counts (broker/jobs.py, feed)."""
    pipe = client.pipeline(transaction=False)
    pipe.set(alive_key(worker), "1", ex=max(1, int(dead_after)))
    pipe.hset(WORKER_SLOTS, worker, json.dumps({"n": max(1, slots), "exp": time.time() + dead_after}))
    pipe.execute()


def forget_gone(client: redis.Redis, now: float | None = None) -> int:
    """Drop the slot counts of workers gone for a day (the reconciler calls it now and then)."""
    now = time.time() if now is None else now
    gone = [w for w, raw in client.hgetall(WORKER_SLOTS).items() if json.loads(raw).get("exp", 0) < now - 86400]
    return client.hdel(WORKER_SLOTS, *gone) if gone else 0


def dead(client: redis.Redis, workers: set[str]) -> set[str]:
    """Those of ``workers`` without a living key."""
    names = sorted(workers)
    if not names:
        return set()
    pipe = client.pipeline(transaction=False)  # one round trip for the farm, not one per worker
    for name in names:
        pipe.exists(alive_key(name))
    return {name for name, alive in zip(names, pipe.execute()) if not alive}


def mark_holding(client: redis.Redis, worker: str, task_ids: Iterable[str], dead_after: float,
                 at: float | None = None) -> None:
    """Report the task ids ``worker``'s consumer holds (waiting, scheduled or running). ``at``: when
    they were read, taken *before* reading them, so that a message this report does not name and
    that reached kombu's unacknowledged hash well before ``at`` is not held by this worker."""
    report = {"t": time.time() if at is None else at, "ids": sorted(task_ids)}
    client.set(holds_key(worker), json.dumps(report), ex=max(1, int(dead_after)))


@dataclass(frozen=True)
class Holdings:
    """What the living consumers last reported holding: (when, task ids) each."""

    reports: tuple[tuple[float, frozenset[str]], ...]

    def may_hold(self, task_id: str, unacked_since: float, margin: float = HOLD_MARGIN) -> bool:
        """Whether a living consumer may hold a message taken at ``unacked_since``: one names it,
        or one reported too soon after it to have named it (which one took it, kombu does not say)."""
        return any(task_id in ids or at < unacked_since + margin for at, ids in self.reports)


def holdings(client: redis.Redis) -> Holdings:
    keys = list(client.scan_iter(match=f"{HOLDS_PREFIX}*", count=500))
    reports = []
    for raw in client.mget(keys) if keys else []:
        if raw:  # expired between the scan and the read: that consumer is gone
            report = json.loads(raw)
            reports.append((float(report["t"]), frozenset(report["ids"])))
    return Holdings(tuple(reports))
