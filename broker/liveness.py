"""Which worker processes are alive: a key each one renews, that expires when it stops.

A worker killed outright (SIGKILL, the OOM killer, a host that lost power) acknowledges nothing:
Redis redelivers its chunk only after ``MLFARM_VISIBILITY_TIMEOUT`` (65 min by default, since it must
outlast the longest chunk), and its frames say "running" all that time. Every process that renders
renews ``mlfarm:alive:<worker>`` (the name frame records carry) every quarter of
``MLFARM_WORKER_DEAD_AFTER``; the reconciler (broker/reconcile.py) queues again the running frames
of a worker whose key has expired, within a minute or two instead of an hour.
"""

from __future__ import annotations

import redis

ALIVE_PREFIX = "mlfarm:alive:"  # beside the job records (broker/jobs.py), which ask it who is silent


def alive_key(worker: str) -> str:
    return f"{ALIVE_PREFIX}{worker}"


def mark_alive(client: redis.Redis, worker: str, dead_after: float) -> None:
    client.set(alive_key(worker), "1", ex=max(1, int(dead_after)))


def dead(client: redis.Redis, workers: set[str]) -> set[str]:
    """Those of ``workers`` without a living key."""
    names = sorted(workers)
    if not names:
        return set()
    pipe = client.pipeline(transaction=False)  # one round trip for the farm, not one per worker
    for name in names:
        pipe.exists(alive_key(name))
    return {name for name, alive in zip(names, pipe.execute()) if not alive}
