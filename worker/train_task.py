"""The ``mlfarm.train`` task: one training run, on a worker that consumes the ``train`` queue.

A training job's frames are its epochs: the task claims each epoch when it starts and marks it
done once that epoch's checkpoint is on disk, so `mlfarm status` counts epochs truthfully, and
the step and loss go in the job record's progress.

A run can outlast the broker's visibility timeout (the time after which an unacknowledged message
is handed to another worker). So while it trains, a heartbeat thread keeps the message's
delivery fresh in kombu's unacked index and renews a lease on the job: a living trainer is never
doubled, and a dead one's message comes back after the timeout and resumes from the newest
checkpoint. A warm shutdown (SIGTERM) checkpoints and puts the message back on the queue.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_shutting_down
from kombu.transport.redis import Channel

from mlfarm.broker.celery_app import TRAIN_TASK
from mlfarm.broker.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobSpec, JobStore
from mlfarm.broker.registry import publish_catalog
from mlfarm.keys import lease_key
from mlfarm.models.training.hooks import Hooks, Progress, Stopped
from mlfarm.models.training.runs import TrainConfig

from .errors import describe_error
from .gpu import torch_device
from .heartbeat import beating
from .runtime import Runtime, WorkerProcess

log = logging.getLogger(__name__)

_shutting_down = threading.Event()


@worker_shutting_down.connect(weak=False)
def _on_shutdown(**_: Any) -> None:
    _shutting_down.set()


class TrainingFailed(Exception):
    """Raised after the job record says why, so Flower lists the task as failed too."""


class FarmHooks(Hooks):
    """The trainer's link to the job record: epochs claimed and finished, progress, stop requests."""

    def __init__(self, rt: Runtime, spec: JobSpec, deadline: float):
        self.rt, self.spec, self.deadline = rt, spec, deadline
        self.store: JobStore = rt.store
        self.epochs = set(spec.frames)
        self._reported = 0.0
        self._asked = 0.0

    def report(self, progress: Progress, **extra: Any) -> None:
        self.store.set_progress(self.spec.id, {**progress.to_dict(), "worker": self.rt.worker, **extra})
        self._reported = time.monotonic()

    def resumed(self, progress: Progress) -> None:
        for epoch in sorted(e for e in self.epochs if e <= progress.epoch):
            self.store.finish_frame(self.spec.id, epoch, DONE, worker=self.rt.worker)
        self.report(progress)

    def epoch_starting(self, epoch: int) -> bool:
        if epoch not in self.epochs:
            return True
        return self.store.start_frames(self.spec.id, [epoch], self.rt.worker)[epoch] != CANCELLED

    def step_done(self, progress: Progress) -> None:
        if time.monotonic() - self._reported >= 1.0:
            self.report(progress)

    def epoch_done(self, progress: Progress) -> None:
        self.report(progress)
        if progress.epoch in self.epochs:
            self.store.finish_frame(self.spec.id, progress.epoch, DONE, worker=self.rt.worker)
        try:  # the new checkpoint becomes a choice in every submitter's catalog (Nuke, the gateway)
            publish_catalog(self.rt.client, {self.spec.model: self.rt.catalog.describe(self.spec.model)},
                            self.rt.worker)
        except Exception as exc:  # the catalog is a convenience; the run goes on
            log.warning("run %s: could not publish its catalog entry: %s", self.spec.model, exc)

    def stop_reason(self) -> str | None:
        if _shutting_down.is_set():
            return "worker shutting down"
        if time.monotonic() > self.deadline:
            return "time limit"
        if time.monotonic() - self._asked >= 1.0:
            self._asked = time.monotonic()
            if self.store.is_cancelled(self.spec.id):
                return "cancelled"
        return None


# --- keeping a long task's delivery -----------------------------------------------------------
def _take_lease(client: redis.Redis, run: str, holder: str, ttl: float, interval: float) -> str | None:
    """Take the run's lease, waiting out one lease lifetime for a dead holder's to expire; None if
    taken, else the living holder ("JOB_ID WORKER")."""
    give_up = time.monotonic() + ttl + interval
    while True:
        if client.set(lease_key(run), holder, nx=True, px=int(ttl * 1000)):
            return None
        if time.monotonic() > give_up:
            return client.get(lease_key(run)) or "an unknown trainer"
        time.sleep(interval / 2)


@contextlib.contextmanager
def _heartbeat(client: redis.Redis, run: str, holder: str, delivery_tag: str | None,
               interval: float) -> Iterator[None]:
    """Keep the run's lease and the task's unacked entry fresh, so the broker never redelivers a
    training task that is alive, and release the lease at the end."""
    ttl_ms = int(interval * 3000)

    def beat() -> None:
        pipe = client.pipeline(transaction=False)
        pipe.set(lease_key(run), holder, px=ttl_ms)
        if delivery_tag:  # XX: never re-create an entry the worker has acknowledged
            pipe.zadd(Channel.unacked_index_key, {delivery_tag: time.time()}, xx=True)
        pipe.execute()

    try:
        with beating(beat, interval, f"run {run}"):
            yield
    finally:
        with contextlib.suppress(redis.RedisError):
            if client.get(lease_key(run)) == holder:
                client.delete(lease_key(run))


# --- the task -------------------------------------------------------------------------------------
def _end_epochs(store: JobStore, job_id: str, states: tuple[str, ...], to: str, reason: str, worker: str) -> None:
    for fs in store.status(job_id).frames:
        if fs.state in states:
            store.finish_frame(job_id, fs.frame, to, reason, worker=worker)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_training(rt: Runtime, job_id: str, delivery_tag: str | None) -> str:
    settings, store = rt.settings, rt.store
    spec = store.spec(job_id)
    if store.is_cancelled(job_id):
        _end_epochs(store, job_id, (QUEUED, RUNNING), CANCELLED, "cancelled", rt.worker)
        return "cancelled"
    interval = settings.train_heartbeat
    holder = f"{job_id} {rt.worker}"
    other = _take_lease(rt.client, spec.model, holder, interval * 3, interval)
    if other is not None:
        if other.split()[0] == job_id:  # a second delivery of a job whose trainer is alive
            log.warning("job %s: already being trained by %s; this delivery is dropped", job_id, other)
            return "already running"
        reason = f"run {spec.model} is being trained by job {other.split()[0]}; retry once it ends"
        _end_epochs(store, job_id, (QUEUED, RUNNING), FAILED, reason, rt.worker)
        raise TrainingFailed(reason)
    from mlfarm.models.training.loop import Trainer  # torch: only in a worker that trains

    config = TrainConfig.from_dict(spec.options)
    hooks = FarmHooks(rt, spec, time.monotonic() + settings.train_time_limit)
    # Alone in the worker: training takes the whole GPU and sets torch's thread count.
    with _heartbeat(rt.client, spec.model, holder, delivery_tag, interval), rt.gate.hold(f"train {job_id}"):
        try:
            device = torch_device("gpu", settings.device)
            log.info("job %s: training %s (%s) on %s, epochs %s", job_id, config.name, config.template, device,
                     f"{min(spec.frames)}-{max(spec.frames)}" if spec.frames else "none")
            trainer = Trainer(config, settings.storage_root, device, settings.train_checkpoint_interval,
                              settings.train_keep_checkpoints, hooks)
            with _threads(settings.train_threads):
                progress = trainer.run()
        except Stopped as stop:
            hooks.report(stop.progress, stopped=stop.reason)
            return _stopped(rt, spec, stop)
        except Exception as exc:
            reason = f"training {config.name} failed: {describe_error(exc)}"
            log.exception("job %s: %s", job_id, reason)
            _end_epochs(store, job_id, (QUEUED, RUNNING), FAILED, reason, rt.worker)
            raise TrainingFailed(reason) from None
    log.info("job %s: %s trained to step %d, loss %s", job_id, config.name, progress.step, progress.loss)
    return "done"


def _stopped(rt: Runtime, spec: JobSpec, stop: Stopped) -> str:
    store, step = rt.store, stop.progress.step
    if stop.reason == "cancelled":
        _end_epochs(store, spec.id, (QUEUED, RUNNING), CANCELLED, "cancelled", rt.worker)
        return "cancelled"
    if stop.reason == "worker shutting down":
        log.info("job %s: worker stopping; checkpoint at step %d, back on the queue", spec.id, step)
        store.requeue(spec.id, (RUNNING,), unsent=False)  # the same message comes back
        raise Reject("worker shutting down; resumes from its checkpoint", requeue=True)
    reason = (f"time limit of {rt.settings.train_time_limit}s reached at step {step} (checkpoint "
              f"{stop.progress.checkpoint}); `mlfarm retry {spec.id}` resumes from it")
    _end_epochs(store, spec.id, (QUEUED, RUNNING), FAILED, reason, rt.worker)
    return "time limit"


def register_training(app: Celery, policy: dict[str, Any], process: WorkerProcess) -> None:
    @app.task(name=TRAIN_TASK, **policy)
    def train(self: Any, job_id: str) -> str:
        """Train the run of job ``job_id``, resuming from its newest checkpoint."""
        return run_training(process.runtime(), job_id, (self.request.properties or {}).get("delivery_tag"))
