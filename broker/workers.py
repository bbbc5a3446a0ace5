"""The farm's workers as they describe themselves: who is alive, what each is, what it can take.

Each worker (one Celery worker: ``mlfarm-gpu0@host``) renews ``mlfarm:node:<name>`` with its
holdings heartbeat (worker/heartbeat.py): host, GPU, tags, facts, the queues it consumes. The key
expires MLFARM_WORKER_DEAD_AFTER after the worker stops, so the keys that exist are the living
workers. Their task processes add what they do to ``mlfarm:worker:<name>:<pid>`` (the per-process
metrics, worker/middleware.py): models loaded, the jobs they render, frames done and failed per
minute. ``mlfarm workers`` and ``Farm.workers()`` join the two.

Python 3.7 grammar: Nuke's Python imports the job records that use it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mlfarm.keys import WORKER_NODES, worker_node_key

from .requirements import missing

#: Minutes the per-process counters keep (``frames done/failed in the last hour``).
WINDOW_MINUTES = 60


@dataclass
class WorkerInfo:
    name: str  # the Celery worker's name, as frame records and Flower show it (with :pid on frames)
    host: str = ""
    gpu: str = ""  # the GPU's name, "" for a CPU worker
    tags: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # gpu_memory_gb, cores...
    queues: list[str] = field(default_factory=list)  # plain queues it consumes
    requirement_queues: list[str] = field(default_factory=list)  # requirement queues it consumes
    started: float | None = None
    heartbeat: float | None = None
    # From its task processes' metrics:
    models: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)  # jobs it is rendering now
    done_last_hour: int = 0
    failed_last_hour: int = 0
    alive: bool = True

    def can_take(self, queue: str, requirement: list[str]) -> bool:
        """Whether its consumer takes chunks of a job on ``queue`` with ``requirement``."""
        return queue in self.queues and not missing(requirement, self.tags, self.facts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def publish_node(client: Any, info: WorkerInfo, ttl: float) -> None:
    info.heartbeat = time.time()
    record = {k: v for k, v in asdict(info).items()
              if k not in ("models", "jobs", "done_last_hour", "failed_last_hour", "alive")}
    pipe = client.pipeline(transaction=False)
    pipe.set(worker_node_key(info.name), json.dumps(record, sort_keys=True), ex=max(1, int(ttl)))
    pipe.sadd(WORKER_NODES, info.name)
    pipe.execute()


def forget_node(client: Any, name: str) -> None:
    """A worker that stops cleanly is gone at once, not MLFARM_WORKER_DEAD_AFTER later."""
    client.pipeline(transaction=False).delete(worker_node_key(name)).srem(WORKER_NODES, name).execute()


def living_workers(client: Any) -> list[WorkerInfo]:
    """The workers whose heartbeat has not expired, by name (a set and one MGET: cheap enough for
    every status poll, unlike a SCAN over a keyspace holding the frame cache)."""
    names = sorted(client.smembers(WORKER_NODES))
    out = []
    gone = []
    for name, raw in zip(names, client.mget([worker_node_key(n) for n in names]) if names else []):
        if not raw:  # its heartbeat expired: the worker is gone
            gone.append(name)
            continue
        try:
            record = json.loads(raw)
            out.append(WorkerInfo(**{k: v for k, v in record.items() if k in WorkerInfo.__dataclass_fields__}))
        except (ValueError, TypeError):
            continue
    if gone:
        client.srem(WORKER_NODES, *gone)
    return sorted(out, key=lambda w: w.name)


def able(workers: list[WorkerInfo], queue: str, requirement: list[str]) -> list[WorkerInfo]:
    return [w for w in workers if w.can_take(queue, requirement)]


def minute() -> int:
    return int(time.time() // 60)


def last_hour(minutes: dict[str, Any], now_minute: int | None = None) -> tuple[int, int]:
    """Frames (done, failed) in the last hour from per-minute counts ``{minute: [done, failed]}``."""
    now_minute = minute() if now_minute is None else now_minute
    done = failed = 0
    for m, counts in minutes.items():
        if now_minute - int(m) < WINDOW_MINUTES:
            done += int(counts[0])
            failed += int(counts[1])
    return done, failed


def list_workers(client: Any) -> list[WorkerInfo]:
    """The living workers, each with what its task processes last published (models, jobs, counts)."""
    from mlfarm.keys import worker_stats_key

    workers = living_workers(client)
    if not workers:
        return workers
    by_name = {w.name: w for w in workers}
    keys = sorted(client.scan_iter(match=worker_stats_key("*"), count=500))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, ["node", "models", "jobs", "minutes", "updated"])
    now_minute = minute()
    for node, models, jobs, minutes, updated in pipe.execute() if keys else []:
        w = by_name.get(node or "")
        if w is None:
            continue
        try:
            if updated and w.started and float(updated) >= w.started:  # not a process before a restart
                w.models = sorted(set(w.models) | set(json.loads(models or "[]")))
                w.jobs = sorted(set(w.jobs) | set(json.loads(jobs or "[]")))
            done, failed = last_hour(json.loads(minutes or "{}"), now_minute)
        except (ValueError, TypeError, IndexError):
            continue
        w.done_last_hour += done
        w.failed_last_hour += failed
    return workers
