"""Cross-cutting concerns of running a chunk, in one place (like dramatiq's middleware).

The chunk pipeline calls every middleware's hooks in order; logging and metrics live here rather
than being sprinkled through the pipeline. Celery-level policy (retries on broker outages, time
limits) is set once in ``worker.tasks``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from mlfarm.keys import WORKER_STATS_TTL, worker_stats_key

log = logging.getLogger("mlfarm.worker")


class ChunkRun(Protocol):
    """What hooks see of a running chunk (``pipeline.ChunkRun``), so this module needs not import it."""

    spec: Any
    result: Any  # ChunkResult: done, failed, skipped, cancelled
    stage_seconds: dict[str, float]
    started: float
    first_done: float | None

    @property
    def label(self) -> str: ...


class Middleware:
    def before_chunk(self, run: ChunkRun) -> None:
        pass

    def after_frame(self, run: ChunkRun, frame: int, error: str | None) -> None:
        pass

    def after_chunk(self, run: ChunkRun) -> None:
        pass


class Logging(Middleware):
    def before_chunk(self, run: ChunkRun) -> None:
        log.info("job %s %s: frames %s", run.spec.id, run.spec.model, run.label)

    def after_frame(self, run: ChunkRun, frame: int, error: str | None) -> None:
        if error:
            log.warning("job %s: %s", run.spec.id, error)

    def after_chunk(self, run: ChunkRun) -> None:
        r = run.result
        stages = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(run.stage_seconds.items()))
        wall = time.perf_counter() - run.started
        first = f", first frame written after {run.first_done - run.started:.2f}s" if run.first_done is not None else ""
        log.info("job %s %s: %d done (%d cached), %d failed, %d skipped, %d cancelled in %.2fs (%s%s)", run.spec.id,
                 run.label, len(r.done), len(r.cached), len(r.failed), len(r.skipped), len(r.cancelled), wall, stages,
                 first)


@dataclass
class Metrics(Middleware):
    """Per-worker counters, published to Redis so wranglers can see throughput per worker."""

    client: redis.Redis
    worker: str
    publish_every: float = 2.0  # seconds: one Redis write per interval, not per chunk
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _published: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)  # chunks may end side by side

    def after_chunk(self, run: ChunkRun) -> None:
        r = run.result
        with self._lock:
            self.totals["frames_done"] += len(r.done)
            self.totals["frames_cached"] += len(r.cached)
            self.totals["frames_failed"] += len(r.failed)
            self.totals["chunks"] += 1
            for stage, seconds in run.stage_seconds.items():
                self.totals[f"{stage}_seconds"] += seconds
            now = time.monotonic()
            if now - self._published < self.publish_every:
                return
            self._published = now
            stats = json.dumps(self.totals)
        key = worker_stats_key(self.worker)
        try:
            self.client.pipeline(transaction=False).hset(key, mapping={
                "updated": time.time(), "stats": stats}).expire(key, WORKER_STATS_TTL).execute()
        except redis.RedisError as exc:  # metrics must never fail a chunk
            log.debug("could not publish worker metrics: %s", exc)


def default_middleware(client: redis.Redis, worker: str) -> list[Middleware]:
    return [Logging(), Metrics(client, worker)]
