"""Starting a worker process: GPU pinning, queue order, pool choice, catalog publication."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from typing import Any

import redis
from celery import Celery
from celery.concurrency.thread import TaskPool as CeleryThreads
from celery.signals import celeryd_after_setup, worker_ready

from mlfarm.broker.celery_app import QUEUES, make_celery
from mlfarm.broker.connection import broker_url, redis_client
from mlfarm.broker.registry import publish_catalog
from mlfarm.broker.requirements import requirement_queues, split_queue
from mlfarm.broker.workers import forget_node, publish_node
from mlfarm.cpus import format_cpus, pin_cpus
from mlfarm.models.catalog import Catalog
from mlfarm.settings import Settings

from .consumer import ReconnectingConsumer
from .gpu import pin_gpu
from .heartbeat import reporting_holdings
from .nodes import NodeBeat, describe_worker, wanted_queues
from .reconciler import Reconciler
from .reconciler import install as install_reconciler
from .runtime import WorkerProcess
from .sizing import apply as apply_plan
from .sizing import plan_for, worker_device
from .tasks import register_tasks

log = logging.getLogger(__name__)


def ordered_queues(queues: list[str]) -> list[str]:
    """Interactive first, then batch work: the broker is polled in this order. A requirement queue
    (``gpu@80gb``, broker/requirements.py) comes right after its plain queue."""
    unknown = [q for q in queues if split_queue(q)[0] not in QUEUES]
    if unknown:
        raise ValueError(f"unknown queue {', '.join(unknown)} (queues: {', '.join(QUEUES)})")
    return sorted(set(queues), key=lambda q: (QUEUES.index(split_queue(q)[0]), q))


def add_consumer(app: Celery, hostname: str, queue: str, timeout: float = 3.0) -> bool:
    """Have this worker consume ``queue`` too, through its own remote control (from any thread)."""
    return bool(app.control.add_consumer(queue, destination=[hostname], reply=True, timeout=timeout))


class TaskThreads(CeleryThreads):
    """Celery's threads pool, told apart on a cold shutdown (SIGQUIT, Ctrl-C twice).

    Stopping the pool waits for the running tasks, so on a cold shutdown running chunks are told
    first (``WorkerProcess.stop_now``, which ``run_worker`` hands the pool on the app) to stop at
    their next batch and hand their other frames back, as the solo pool's chunks do when Celery
    raises inside them.
    """

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Celery cancels a running task through this: on a cold shutdown, and for a revoke with
        terminate (Flower's "terminate"). A thread cannot be killed, so this does nothing: on a
        cold shutdown ``on_stop`` then tells the chunks to stop at their next batch, and a revoked
        chunk runs on (``mlfarm cancel`` stops a job). The base class raises instead, which Celery
        took as an unrecoverable error, logged as CRITICAL on every cold shutdown."""
        log.info("a running task cannot be killed on the threads pool; it stops at its next batch on a "
                 "cold shutdown, and otherwise runs on")

    def on_stop(self) -> None:
        from celery.worker import state

        if state.should_terminate:  # set by Celery's cold-shutdown handler before it stops the pool
            self.app.mlfarm_process.stop_now.set()
        super().on_stop()


def stop_consuming(app: Celery, hostname: str, queues: list[str], timeout: float = 3.0) -> None:
    """Cancel this worker's task queues through its own remote control, and wait until it has.

    From any thread: Celery runs the command on the consumer's thread, the one place it may run.
    """
    for queue in queues:
        if not app.control.cancel_consumer(queue, destination=[hostname], reply=True, timeout=timeout):
            log.warning("worker %s did not confirm it stopped taking tasks from queue %s", hostname, queue)
    log.info("worker %s takes no more tasks (queues %s)", hostname, ",".join(queues))


TASK_THREADS = f"{__name__}:TaskThreads"


def _forget(client: object, hostname: str) -> None:
    """A worker that stops cleanly leaves the list of living workers at once."""
    try:
        forget_node(client, hostname)
    except Exception as exc:  # it expires on its own
        log.info("could not remove worker %s from the living workers: %s", hostname, exc)


def run_worker(settings: Settings, queues: list[str], concurrency: int = 1, gpu: int | None = None,
               name: str | None = None, loglevel: str = "INFO", cpus: list[int] | None = None,
               tags: str | None = None) -> None:
    """Run a Celery worker in this process until it is told to stop (SIGTERM: warm shutdown).

    One process per GPU is the GPU layout: the models and CUDA context live in the process that
    consumes tasks, which takes ``settings.worker_threads`` tasks at once on threads (Celery's
    threads pool; with 1, the solo pool) so that consecutive chunks overlap (see ``sharing``).
    ``concurrency`` > 1 uses prefork children instead, each loading models in itself after the
    fork; the parent never touches CUDA.
    """
    if gpu is not None:
        pin_gpu(gpu)
    if cpus:
        pin_cpus(cpus)  # before any thread starts: they all inherit it
    hostname = name or f"mlfarm{'-gpu' + str(gpu) if gpu is not None else ''}@{socket.gethostname()}"
    # Every pool sized together from the cores this process has (worker/sizing.py), before torch or
    # any pool starts; the settings the process runs on carry the plan's figures, not the "auto" zeros.
    device = worker_device(settings, gpu)
    plan = plan_for(settings, device, processes=concurrency)
    apply_plan(plan)
    # What the farm sees of this worker (host, GPU, tags), and the requirement queues it takes (worker/nodes.py).
    queues = ordered_queues(queues)
    info = describe_worker(settings, hostname, device, queues, tags)

    @celeryd_after_setup.connect(weak=False)
    def _say_plan(sender: Any, **_: object) -> None:  # the first line once Celery has set up logging
        log.info("worker %s %s", hostname, plan.describe())

    settings = settings.model_copy(update={"worker_threads": plan.tasks, "io_threads": plan.io_threads,
                                           "exr_threads": plan.exr_threads, "torch_threads": plan.torch_threads})
    process = WorkerProcess(hostname, settings)
    url = broker_url(settings)
    try:  # the requirement queues in use that it takes; later ones it picks up on its heartbeat (NodeBeat)
        startup = redis_client(url, role="worker")
        info.requirement_queues = wanted_queues(info, requirement_queues(startup))
        startup.close()
    except redis.RedisError as exc:
        log.warning("could not read the farm's requirement queues yet (%s); taking them once Redis answers", exc)
    app = make_celery(settings, url)
    app.conf.worker_consumer = f"{ReconnectingConsumer.__module__}:{ReconnectingConsumer.__name__}"
    app.mlfarm_process = process  # Celery builds the pool itself: TaskThreads finds the process on its app
    process.app = app
    register_tasks(app, process)
    install_reconciler(app, Reconciler(app, settings, url, hostname))
    reports = contextlib.ExitStack()  # until the process ends, a warm shutdown's last chunks included
    # One process renders (solo or threads pool): its runtime, and with it its heartbeat and task
    # slots (which size every job's share of the farm), start now, not with its first chunk.
    renders_here = concurrency == 1

    @worker_ready.connect(weak=False)
    def _publish(sender: Any, **_: object) -> None:
        if app.conf.worker_pool == TASK_THREADS:  # its watchdog stops the consumer before it ends
            consumer = sender.task_consumer  # its queues when it stops: requirement queues join later
            process.stop_consuming = lambda: stop_consuming(app, hostname, [q.name for q in consumer.queues])
        client = redis_client(url, role="worker")  # the catalog now, the holdings reports for the process's life
        node = NodeBeat(client, info, settings.worker_dead_after, functools.partial(add_consumer, app, hostname))
        reports.callback(_forget, client, hostname)
        try:
            publish_node(client, info, settings.worker_dead_after)  # listed before it says it is ready
        except redis.RedisError as exc:  # the heartbeat tries again every second
            log.warning("could not publish worker %s: %s", hostname, exc)
        reports.enter_context(reporting_holdings(client, hostname, settings.worker_dead_after, also=node))
        descriptions = Catalog.from_settings(settings).describe_all()
        publish_catalog(client, descriptions, hostname)
        if renders_here:
            process.runtime()
        pinned = f" pinned to GPU {gpu} (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" \
            if gpu is not None else ""
        if cpus:
            pinned += f" on cores {format_cpus(cpus)}"
        log.info("worker %s%s ready on queues %s with models %s; tags %s", hostname, pinned,
                 ",".join(queues + info.requirement_queues), ", ".join(sorted(descriptions)), ",".join(info.tags))

    pool = "solo" if concurrency == 1 else "prefork"
    if concurrency == 1 and plan.tasks > 1:
        concurrency = plan.tasks
        pool = "prefork"  # Celery's command line only names its own pools; this one is set in the config
        app.conf.worker_pool = TASK_THREADS
    argv = [
        "worker",
        f"--queues={','.join(ordered_queues(queues + info.requirement_queues))}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
    ]
    with reports:
        app.worker_main(argv)
