"""Following a job from inside Nuke without freezing it.

Nuke's interface runs on its main thread, and nodes may only be touched there. A ``JobWatcher``
polls the farm on a background thread and hands each *changed* progress snapshot to ``deliver``,
which in Nuke wraps ``nuke.executeInMainThread``; the snapshot is an immutable value, so nothing
is shared between the threads. Pure Python (3.7+), testable without Nuke.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Optional

from .results import Progress, expired_progress

log = logging.getLogger(__name__)

#: The share of one core all of a Nuke session's watchers together may spend polling. Reading a job's
#: status grows with its frames (about 4 ms for 1,000 frames, 55 ms for 10,000: bench_nuke_poll.py),
#: so big jobs, or many, are polled less often than the configured interval instead of slowing Nuke.
POLL_CPU_BUDGET = 0.05

#: The longest a label may go without a poll, whatever the budget says.
MAX_WAIT = 30.0


def next_wait(interval: float, poll_cpu_seconds: float, watchers: int, budget: float = POLL_CPU_BUDGET) -> float:
    """Seconds until the next poll: the interval, stretched so ``watchers`` polls costing this much CPU
    stay in budget, but never beyond MAX_WAIT (or the interval, if that is longer)."""
    return max(interval, min(MAX_WAIT, poll_cpu_seconds * max(1, watchers) / budget))


class JobWatcher(threading.Thread):
    """Polls ``poll()`` (a ``JobStatus``) every ``interval`` seconds until the job finishes or ``stop()``."""

    def __init__(self, job_id: str, poll: Callable[[], Any], deliver: Callable[[Progress], None],
                 interval: float = 2.0, max_backoff: float = 30.0):
        super().__init__(name="mlfarm-watch-%s" % job_id, daemon=True)
        self.job_id = job_id
        self._poll = poll
        self._deliver = deliver
        self.interval = interval
        self.max_backoff = max_backoff
        self._stop_event = threading.Event()
        self.last = None  # type: Optional[Progress]
        self.peers = lambda: 1  # how many watchers are polling (set by Watchers)
        self.last_wait = interval

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def run(self) -> None:
        wait = self.interval
        while not self._stop_event.is_set():
            # CPU time of this thread, not wall time: waiting on Redis or for a busy machine costs Nuke nothing.
            started = time.thread_time()
            try:
                progress = Progress.from_status(self._poll())
                wait = next_wait(self.interval, time.thread_time() - started, self.peers())
            except KeyError:  # the farm's JobNotFound: the record expired, nothing more will come
                progress = expired_progress(self.job_id)
            except Exception as exc:  # the farm's Redis unreachable or hung
                log.warning("mlfarm: following job %s: %s", self.job_id, exc)
                base = self.last or Progress(job_id=self.job_id, model="", state="unknown", total=0)
                progress = replace(base, error="farm unreachable: %s" % exc)
                wait = min(self.max_backoff, wait * 2)
            self.last_wait = wait
            if progress != self.last:
                self.last = progress
                try:
                    self._deliver(progress)
                except Exception:  # a node deleted meanwhile, Nuke closing: stop quietly
                    log.exception("mlfarm: could not show progress of job %s", self.job_id)
                    return
            if progress.finished and not progress.error:
                return
            self._stop_event.wait(wait)


class Watchers:
    """At most one watcher per job: resubmitting or refreshing replaces the old one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job = {}  # type: Dict[str, JobWatcher]

    def start(self, watcher: JobWatcher) -> JobWatcher:
        with self._lock:
            old = self._by_job.get(watcher.job_id)
            if old is not None:
                old.stop()
            self._by_job[watcher.job_id] = watcher
        watcher.peers = self.count
        watcher.start()
        return watcher

    def stop(self, job_id: str) -> None:
        with self._lock:
            watcher = self._by_job.pop(job_id, None)
        if watcher is not None:
            watcher.stop()

    def count(self) -> int:
        with self._lock:
            return sum(1 for w in self._by_job.values() if w.is_alive())

    def get(self, job_id: str) -> Optional[JobWatcher]:
        with self._lock:
            return self._by_job.get(job_id)

    def running(self, job_id: str) -> bool:
        w = self.get(job_id)
        return w is not None and w.is_alive()

    def stop_all(self, timeout: float = 5.0) -> None:
        with self._lock:
            watchers = list(self._by_job.values())
            self._by_job.clear()
        for w in watchers:
            w.stop()
        for w in watchers:
            if w.is_alive():
                w.join(timeout)
