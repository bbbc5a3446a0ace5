"""The worker side of broker/reconcile.py: a background thread in each worker's main process.

It looks for lost frames every ``MLFARM_RECONCILE_INTERVAL`` seconds, a few seconds after every
(re)connection to the broker, when a message may just have been lost, and once more when
``MLFARM_RECONCILE_GRACE`` and ``MLFARM_WORKER_DEAD_AFTER`` have passed since then: frames lost in a
broker outage only count as lost once they are older than the grace, and waiting for the next
interval would leave them for minutes. Every half ``MLFARM_WORKER_DEAD_AFTER`` it also looks for
frames still "running" on a worker that has died (broker/liveness.py). Neither heartbeats nor the
workers' reports of the messages they hold are trusted within that time of an outage, when none
could get through. At that pace too it keeps jobs moving (``keep_moving``): it releases frames
whose dependencies are done and sends what fits each job's share, which chunks do as they end, in
case one could not. A Redis lock lets only one worker of the farm do it at a time.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery, bootsteps

from mlfarm.broker.connection import redis_client
from mlfarm.broker.jobs import JobStore
from mlfarm.broker.liveness import forget_gone
from mlfarm.broker.reconcile import keep_moving, reconcile, requeue_orphans
from mlfarm.keys import RECONCILE_LOCK
from mlfarm.settings import Settings

log = logging.getLogger(__name__)

LOCK = RECONCILE_LOCK


class Reconciler(threading.Thread):
    def __init__(self, app: Celery, settings: Settings, url: str, name: str):
        super().__init__(daemon=True, name="mlfarm-reconciler")
        self.app = app
        self.settings = settings
        self.url = url
        self.owner = name
        self._wake = threading.Event()

    def kick(self) -> None:
        """Look soon: the broker connection was just (re)made."""
        self._wake.set()

    def run(self) -> None:
        client = redis_client(self.url, role="reconciler")
        store = JobStore(client, self.settings.job_ttl)
        follow_ups: list[float] = []  # when to look again after a reconnect
        dead_after = self.settings.worker_dead_after
        sweep = max(1.0, dead_after / 2)  # dead workers' frames: a cheaper look
        next_full = time.monotonic() + self.settings.reconcile_interval
        # No worker is judged dead, nor its reports of what it holds trusted, within
        # MLFARM_WORKER_DEAD_AFTER of a (re)connection or a failed look: an outage stops every
        # heartbeat, and the living must have the time to beat again.
        judge_after = 0.0
        while True:
            due = min(next_full, *follow_ups, time.monotonic() + sweep)
            woken = self._wake.wait(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            full = woken or now >= next_full
            if woken:
                self._wake.clear()
                self._wake.wait(5.0)  # let the reconnect settle; a second kick changes nothing
                self._wake.clear()
                now = time.monotonic()
                judge_after = now + dead_after
                # Once frames lost in the outage are older than the grace, and once the reports are
                # trusted again.
                follow_ups = sorted(now + wait + 1.0 for wait in {self.settings.reconcile_grace, dead_after})
            elif follow_ups and now >= follow_ups[0]:
                follow_ups.pop(0)
                full = True
            if full:
                next_full = now + self.settings.reconcile_interval
            try:
                if self._lock(client):  # both log what they queue again, per job
                    judge = time.monotonic() >= judge_after
                    if judge:
                        requeue_orphans(self.app, self.settings, client, store)
                    if full:
                        reconcile(self.app, self.settings, client, store, judge_holders=judge)
                        forget_gone(client)
                    keep_moving(self.app, self.settings, store, client, recount=full)
            except redis.RedisError as exc:  # the broker is away; the next reconnect kicks us again
                log.info("reconciler: %s", exc)
                judge_after = time.monotonic() + dead_after
            except Exception:
                log.exception("reconciler failed; it will try again")

    def _lock(self, client: redis.Redis) -> bool:
        """Take the farm's reconcile lock, or keep it if this worker holds it (its follow-up look)."""
        # It renews the lock every look (at least every half MLFARM_WORKER_DEAD_AFTER); a holder
        # killed outright must not keep the others from noticing it died for long.
        ttl = int(self.settings.worker_dead_after + 10)
        if client.set(LOCK, self.owner, nx=True, ex=ttl):
            return True
        if client.get(LOCK) == self.owner:
            client.expire(LOCK, ttl)
            return True
        return False


def install(app: Celery, reconciler: Reconciler) -> None:
    """Start the reconciler with the worker and kick it on every broker (re)connection."""

    class ReconcileOnConnect(bootsteps.StartStopStep):
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def start(self, consumer: object) -> None:
            if not reconciler.is_alive():
                reconciler.start()
            reconciler.kick()

    app.steps["consumer"].add(ReconcileOnConnect)
