"""What a worker process holds between chunks: settings, Redis, the model cache, I/O threads.

Built lazily in the process that runs tasks (a prefork child, or the worker itself with the solo
or threads pool), never in a parent that forks, so each process has its own Redis sockets and CUDA
context.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis

from mlfarm.broker.connection import broker_url, redis_client
from mlfarm.broker.jobs import JobSpec, JobStore
from mlfarm.broker.liveness import mark_alive
from mlfarm.models.catalog import Catalog
from mlfarm.settings import Settings

from .frame_cache import FrameCache
from .gpu_turns import GpuTurns
from .heartbeat import beating
from .lanes import LanePools, start_io
from .middleware import Middleware, default_middleware
from .model_cache import ModelCache
from .scheduling import Scheduling
from .sharing import TaskGate
from .watchdog import Watchdog

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    client: redis.Redis
    store: JobStore
    catalog: Catalog
    cache: ModelCache
    io: ThreadPoolExecutor
    middleware: list[Middleware]
    worker: str
    frame_cache: FrameCache
    node: str = ""  # the Celery worker's name (``worker`` is it with this process's id)
    stop_consuming: Callable[[], None] = lambda: None  # the consumer takes no more tasks (WorkerProcess)
    stop_now: threading.Event = field(default_factory=threading.Event)  # WorkerProcess.stop_now
    lanes: LanePools = field(default_factory=LanePools)
    turns: GpuTurns = field(default_factory=GpuTurns)  # whole-GPU turns (models with gpu_turns)
    gate: TaskGate = field(default_factory=TaskGate)  # which tasks run side by side (worker_threads)
    watchdog: Watchdog = field(init=False)  # MLFARM_FRAME_TIME_LIMIT, where Celery's pools do not enforce it
    liveness: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # its heartbeat, for good
    _specs: OrderedDict[str, JobSpec] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.watchdog = Watchdog(self.stop_now, on_stop=self._turn_away)

    def _turn_away(self) -> None:
        """The process is ending: take no more tasks, then send the waiting ones back to the queue.

        In that order, or the consumer fetches each task it sent back again at once, in a loop, until
        the process ends; and a process that ends between the broker handing over a message and the
        consumer recording it as unacknowledged loses it (kombu's Redis transport).
        """
        try:
            self.stop_consuming()
        except Exception:
            log.exception("could not stop taking tasks: those waiting go back to the queue anyway")
        self.gate.close()

    def spec(self, job_id: str) -> JobSpec:
        """A job's spec, fetched once per process: specs never change after submission."""
        spec = self._specs.get(job_id)
        if spec is None:
            spec = self._specs[job_id] = self.store.spec(job_id)
            while len(self._specs) > 256:
                self._specs.popitem(last=False)
        return spec


@dataclass
class WorkerProcess:
    """What `mlfarm worker` knows of this process, handed to its tasks when they are registered.

    Prefork children inherit it with the fork and build their own runtime from it on first use.
    """

    name: str  # the Celery worker's name, recorded on each frame with the process id
    settings: Settings
    #: Stops this process's Celery consumer taking tasks; set by worker/main.py once the consumer is
    #: up, for the threads pool, whose consumer stays free while a pool thread is stuck.
    stop_consuming: Callable[[], None] | None = None
    #: Set on a cold shutdown (SIGQUIT, Ctrl-C twice; ``main.TaskThreads``) or by the watchdog:
    #: running chunks stop at their next batch and hand their other frames back. (With the solo
    #: pool Celery raises inside the running task instead.)
    stop_now: threading.Event = field(default_factory=threading.Event)
    #: The Celery app its tasks run in: chunks that end send their job's next ones (worker/scheduling.py).
    app: Any = None
    _runtime: Runtime | None = field(default=None, init=False, repr=False)
    _building: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def runtime(self) -> Runtime:
        """The process's runtime; the first task to ask builds it, others (threads) wait for it."""
        with self._building:
            if self._runtime is None:
                self._runtime = _build_runtime(self)
            return self._runtime

    def _stop_consuming(self) -> None:
        if self.stop_consuming is not None:
            self.stop_consuming()


def _build_runtime(process: WorkerProcess) -> Runtime:
    settings = process.settings
    client = redis_client(broker_url(settings), patient=True, role="worker")
    catalog = Catalog.from_settings(settings)
    name = f"{process.name}:{os.getpid()}"
    store = JobStore(client, settings.job_ttl)
    cache = ModelCache(catalog, settings.model_cache_size, settings.device, settings)
    middleware = default_middleware(client, name, process.name, cache.warm)
    if process.app is not None:
        middleware.append(Scheduling(process.app, settings, store))
    rt = Runtime(
        settings=settings,
        client=client,
        store=store,
        catalog=catalog,
        cache=cache,
        io=start_io(settings),
        middleware=middleware,
        worker=name,
        node=process.name,
        frame_cache=FrameCache(client, settings),
        stop_consuming=process._stop_consuming,
        stop_now=process.stop_now,
    )
    # Beats for the life of the process: one killed outright stops, and the reconciler queues the
    # frames it was rendering again (broker/liveness.py).
    beat = functools.partial(mark_alive, client, name, settings.worker_dead_after, settings.worker_threads)
    beat()
    rt.liveness.enter_context(beating(beat, settings.worker_dead_after / 4, "alive"))
    return rt
