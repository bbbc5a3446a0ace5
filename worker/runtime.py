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
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

import redis

from mlfarm.broker.connection import broker_url, redis_client
from mlfarm.broker.jobs import JobSpec, JobStore
from mlfarm.broker.liveness import mark_alive
from mlfarm.models.catalog import Catalog
from mlfarm.settings import Settings, get_settings

from .cpus import available_cpus
from .frame_io import configure_openexr
from .heartbeat import beating
from .middleware import Middleware, default_middleware
from .model_cache import ModelCache
from .sharing import TaskGate
from .watchdog import Watchdog

log = logging.getLogger(__name__)


class LanePools:
    """The lane threads a model with ``lanes`` > 1 runs batches on, kept for the life of the process.

    Kept, not made per chunk, because what a GPU library tunes or compiles may be tied to the
    thread: PyTorch keeps cuDNN's autotuned convolution plans per thread, and lanes made afresh for
    each chunk re-tuned (and recompiled kernels) every chunk, at half the speed of one lane.
    """

    def __init__(self) -> None:
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def get(self, lanes: int) -> ThreadPoolExecutor:
        with self._lock:
            pool = self._pools.get(lanes)
            if pool is None:
                pool = self._pools[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix=f"mlfarm-lane{lanes}")
            return pool


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
    lanes: LanePools = field(default_factory=LanePools)
    gate: TaskGate = field(default_factory=TaskGate)  # which tasks run side by side (worker_threads)
    watchdog: Watchdog = field(init=False)  # MLFARM_FRAME_TIME_LIMIT, where Celery's pools do not enforce it
    liveness: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # its heartbeat, for good
    _specs: OrderedDict[str, JobSpec] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.watchdog = Watchdog(STOP_NOW, on_stop=self._turn_away)

    def _turn_away(self) -> None:
        """The process is ending: take no more tasks, then send the waiting ones back to the queue.

        In that order, or the consumer fetches each task it sent back again at once, in a loop, until
        the process ends; and a process that ends between the broker handing over a message and the
        consumer recording it as unacknowledged loses it (kombu's Redis transport).
        """
        if stop_consuming is not None:
            try:
                stop_consuming()
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


def worker_name() -> str:
    """Recorded on each frame: the Celery worker's name (set by `mlfarm worker`) and the process."""
    return f"{os.environ.get('MLFARM_WORKER_NAME') or socket.gethostname()}:{os.getpid()}"


def io_threads(settings: Settings) -> int:
    """``settings.io_threads``, or with 0 the cores this process may run on less two: one for the
    thread that feeds the GPU, one for everything else."""
    return settings.io_threads or max(2, len(available_cpus()) - 2)


def _io_thread_start(nice: int) -> None:
    """Each I/O thread (Linux: niceness is per thread) yields the CPU to the GPU-feeding thread."""
    if nice:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError as exc:
            log.warning("could not lower the I/O threads' priority: %s", exc)


def start_io(settings: Settings) -> ThreadPoolExecutor:
    """The worker's I/O threads; OpenEXR's own pool is started from one of them, so its threads
    inherit their priority."""
    pool = ThreadPoolExecutor(io_threads(settings), thread_name_prefix="mlfarm-io", initializer=_io_thread_start,
                              initargs=(settings.io_nice,))
    pool.submit(configure_openexr, settings.exr_threads).result()
    return pool


#: Set on a cold shutdown (SIGQUIT, Ctrl-C twice): running chunks stop at their next batch and hand
#: their other frames back. (With the solo pool Celery raises inside the running task instead.)
STOP_NOW = threading.Event()
#: Stops this process's Celery consumer taking tasks; set by worker/main.py once the consumer is up,
#: for the threads pool, whose consumer stays free while a pool thread is stuck.
stop_consuming: Callable[[], None] | None = None
_building = threading.Lock()


def runtime() -> Runtime:
    """The process's runtime; the first task to ask builds it, others (threads) wait for it."""
    with _building:
        return _build_runtime()


@lru_cache(maxsize=1)
def _build_runtime() -> Runtime:
    settings = get_settings()
    client = redis_client(broker_url(settings), patient=True, role="worker")
    catalog = Catalog.from_settings(settings)
    name = worker_name()
    rt = Runtime(
        settings=settings,
        client=client,
        store=JobStore(client, settings.job_ttl),
        catalog=catalog,
        cache=ModelCache(catalog, settings.model_cache_size, settings.device),
        io=start_io(settings),
        middleware=default_middleware(client, name),
        worker=name,
    )
    # Beats for the life of the process: one killed outright stops, and the reconciler queues the
    # frames it was rendering again (broker/liveness.py).
    beat = functools.partial(mark_alive, client, name, settings.worker_dead_after)
    beat()
    rt.liveness.enter_context(beating(beat, settings.worker_dead_after / 4, "alive"))
    return rt
