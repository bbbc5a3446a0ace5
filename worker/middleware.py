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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from mlfarm.broker.workers import WINDOW_MINUTES, minute
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

    def chunk_ended(self, run: ChunkRun) -> None:
        """After every chunk, also one that raised (``after_chunk`` runs only for those that finished)."""


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
    """Per-worker counters, published to Redis so wranglers can see throughput per worker.

    Also what ``mlfarm workers`` shows of this process (broker/workers.py): its worker's name
    (``node``), the models it holds warm, the jobs it is rendering, and frames done and failed per
    minute over the last hour. A change is published within ``publish_every`` seconds (a timer
    catches the last one), never more than once per interval.
    """

    client: redis.Redis
    worker: str
    publish_every: float = 2.0  # seconds: one Redis write per interval, not per chunk
    node: str = ""  # the Celery worker's name this process belongs to
    warm: Callable[[], list[str]] = list  # the models this process holds loaded
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    minutes: dict[int, list[int]] = field(default_factory=dict)  # minute -> [done, failed]
    jobs: dict[int, str] = field(default_factory=dict)  # running chunk -> its job
    _published: float = 0.0
    _timer: threading.Timer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)  # chunks may end side by side

    def before_chunk(self, run: ChunkRun) -> None:
        with self._lock:
            self.jobs[id(run)] = run.spec.id
        self._publish_soon()

    def chunk_ended(self, run: ChunkRun) -> None:
        with self._lock:
            self.jobs.pop(id(run), None)
        self._publish_soon()

    def after_chunk(self, run: ChunkRun) -> None:
        r = run.result
        failed = len(r.failed) + len(getattr(r, "requeued", ()))  # requeued: failed here, tried elsewhere
        with self._lock:
            self.totals["frames_done"] += len(r.done)
            self.totals["frames_cached"] += len(r.cached)
            self.totals["frames_failed"] += failed
            self.totals["chunks"] += 1
            for stage, seconds in run.stage_seconds.items():
                self.totals[f"{stage}_seconds"] += seconds
            counts = self.minutes.setdefault(minute(), [0, 0])
            counts[0] += len(r.done)
            counts[1] += failed

    def _publish_soon(self) -> None:
        with self._lock:
            wait = self.publish_every - (time.monotonic() - self._published)
            if wait > 0:
                if self._timer is None:
                    self._timer = threading.Timer(wait, self.publish)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.publish()

    def publish(self) -> None:
        with self._lock:
            self._timer = None
            self._published = time.monotonic()
            oldest = minute() - WINDOW_MINUTES
            for m in [m for m in self.minutes if m <= oldest]:
                del self.minutes[m]
            fields = {"updated": time.time(), "stats": json.dumps(self.totals), "node": self.node,
                      "jobs": json.dumps(sorted(set(self.jobs.values()))),
                      "minutes": json.dumps({str(m): c for m, c in self.minutes.items()})}
        try:
            fields["models"] = json.dumps(sorted(self.warm()))
        except Exception:  # the cache is changing under us: next time
            pass
        key = worker_stats_key(self.worker)
        try:
            self.client.pipeline(transaction=False).hset(key, mapping=fields).expire(key, WORKER_STATS_TTL).execute()
        except redis.RedisError as exc:  # metrics must never fail a chunk
            log.debug("could not publish worker metrics: %s", exc)


def default_middleware(client: redis.Redis, worker: str, node: str = "",
                       warm: Callable[[], list[str]] = list) -> list[Middleware]:
    return [Logging(), Metrics(client, worker, node=node, warm=warm)]
