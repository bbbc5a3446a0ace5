"""Where the gateway's inference runs: on the farm's workers, or in its own process (``--local``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlfarm.broker.celery_app import INTERACTIVE_TASK, make_celery
from mlfarm.broker.connection import broker_url, redis_client
from mlfarm.broker.registry import read_catalog
from mlfarm.exchange.images import WireImage
from mlfarm.exchange.inference import run_model
from mlfarm.exchange.relay import DONE, TAKEN, Relay, raw_redis_client
from mlfarm.exchange.spool import Spool, SpoolError
from mlfarm.models.catalog import Catalog
from mlfarm.settings import Settings
from mlfarm.worker.model_cache import ModelCache

log = logging.getLogger(__name__)


class InferenceFailed(RuntimeError):
    """The request was valid but produced no result; the message is shown to the artist."""


@dataclass
class Result:
    images: list[WireImage]
    objects: list[Any] = field(default_factory=list)


class Backend(Protocol):
    def describe_all(self) -> dict[str, dict[str, Any]]: ...

    def infer(self, model: str, options: dict[str, Any], images: list[WireImage]) -> Result: ...

    def close(self) -> None: ...


class LocalBackend:
    """Models run in the gateway's process, as the seed's server did on one workstation.

    Each model runs on a thread of its own: requests for different models run at once, requests
    for the same model take turns (a model's ``lanes`` say how many threads may call it; the seed's
    models are not thread-safe). One thread per model rather than each connection thread calling
    it: torch gives every thread that calls it its own team of OpenMP threads, so each of the
    gateway's connection threads would end up with one (one extra thread per connection thread on
    2 cores, a core's worth each on a bigger machine). The cache is
    sized to hold every model so that none is unloaded while another is in use.
    """

    def __init__(self, settings: Settings):
        self.catalog = Catalog.from_settings(settings)
        self.cache = ModelCache(self.catalog, max(1, len(self.catalog.names())), settings.device, settings)
        self._runners: dict[str, ThreadPoolExecutor] = {}
        self._runners_guard = threading.Lock()

    def describe_all(self) -> dict[str, dict[str, Any]]:
        return self.catalog.describe_all()

    def _runner(self, model: str) -> ThreadPoolExecutor:
        with self._runners_guard:
            runner = self._runners.get(model)
            if runner is None:
                runner = self._runners[model] = ThreadPoolExecutor(1, thread_name_prefix=f"mlfarm-model-{model}")
            return runner

    def _run(self, model: str, options: dict[str, Any], images: list[WireImage]) -> tuple[list[WireImage], list]:
        return run_model(self.cache.get(model), options, images)

    def infer(self, model: str, options: dict[str, Any], images: list[WireImage]) -> Result:
        try:
            out, objects = self._runner(model).submit(self._run, model, options, images).result()
        except Exception as exc:
            log.exception("model %s failed", model)
            raise InferenceFailed(f"model {model} failed: {type(exc).__name__}: {exc}") from None
        return Result(out, objects)

    def close(self) -> None:
        for runner in self._runners.values():
            runner.shutdown(wait=True)


class FarmBackend:
    """Requests go to the ``interactive`` queue, which every worker polls before batch work.

    The gateway waits for a worker to take the request (``MLFARM_GATEWAY_PICKUP_TIMEOUT``), then
    for its result: up to one frame's time limit, but only while the worker's heartbeat lasts, so
    an artist hears within seconds that the worker died instead of minutes later. The catalog is
    the one workers publish. Pixels travel by ``MLFARM_GATEWAY_TRANSPORT`` (see relay and spool).
    """

    #: Seconds between sweeps of the spool folder for files that killed processes left behind.
    SWEEP_INTERVAL = 60.0

    def __init__(self, settings: Settings):
        self.settings = settings
        url = broker_url(settings)
        self.redis = redis_client(url)
        self.pickup_timeout = settings.gateway_pickup_timeout
        self.result_timeout = float(settings.frame_time_limit) + 30.0
        self.heartbeat = settings.gateway_heartbeat
        self.spool = Spool(settings.storage_root) if settings.gateway_transport == "storage" else None
        client = raw_redis_client(url, max(self.pickup_timeout, self.result_timeout) + 30.0)
        self.relay = Relay(client, self.spool, send_spooled=self.spool is not None)
        self.celery = make_celery(settings, url)
        self._stale_after = self.pickup_timeout + self.result_timeout + 60.0
        self._next_sweep = 0.0
        self._sweep()

    def describe_all(self) -> dict[str, dict[str, Any]]:
        return read_catalog(self.redis)

    def _sweep(self) -> None:
        if self.spool is not None and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.SWEEP_INTERVAL
            self.spool.sweep(self._stale_after)

    def infer(self, model: str, options: dict[str, Any], images: list[WireImage]) -> Result:
        self._sweep()
        request_id = uuid.uuid4().hex
        ttl = int(self.pickup_timeout) + 60
        marks = [time.perf_counter()]
        try:
            self.relay.put_request(request_id, images, ttl, wait_ttl=int(self._stale_after))
            marks.append(time.perf_counter())
            self.celery.send_task(INTERACTIVE_TASK, args=[request_id, model, options],
                                  kwargs={"heartbeat": self.heartbeat}, queue="interactive",
                                  routing_key="interactive", priority=0, expires=self.pickup_timeout)
            marks.append(time.perf_counter())
            return self._await(request_id, model, marks)
        except SpoolError as exc:
            raise InferenceFailed(f"the gateway cannot pass the frame through shared storage "
                                  f"(MLFARM_GATEWAY_TRANSPORT=storage): {exc}") from None
        finally:
            self.relay.forget(request_id)
            if len(marks) == 6:
                steps = ("put", "send", "pickup", "worker", "fetch")
                log.info("request %s (%s): %s ms", request_id, model, ", ".join(
                    f"{name} {(b - a) * 1000:.1f}" for name, a, b in zip(steps, marks, marks[1:])))

    def _await(self, request_id: str, model: str, marks: list[float]) -> Result:
        signal = self.relay.wait(request_id, self.pickup_timeout)
        if signal is None and self.relay.withdraw(request_id):
            raise InferenceFailed(
                f"no worker took the request for model {model} within {self.pickup_timeout:g}s: is a worker "
                "running that consumes the 'interactive' queue (mlfarm worker --queues interactive,gpu), "
                "and is it free?")
        if signal is None:  # taken just as the pickup time ran out: the claim signals at once
            signal = self.relay.poll(request_id)
        worker = ""
        marks.append(time.perf_counter())
        if signal is not None and signal.startswith(TAKEN):
            worker = signal[len(TAKEN):].decode(errors="replace").strip()
            signal = self._await_result(request_id)
        marks.append(time.perf_counter())
        if signal == _LAPSED:
            raise InferenceFailed(
                f"worker {worker or '?'} stopped while running model {model}: no heartbeat for "
                f"{self.heartbeat:g}s (MLFARM_GATEWAY_HEARTBEAT). It crashed, ran out of memory or was killed; "
                "its log says why. Try again: another worker will take the frame.")
        if signal != DONE:
            raise InferenceFailed(f"worker {worker or '?'} took the request for model {model} but returned no "
                                  f"result within {self.result_timeout:g}s")
        reply = self.relay.take_reply(request_id)
        marks.append(time.perf_counter())
        if reply.error:
            raise InferenceFailed(f"model {model} failed on worker {reply.worker or worker}: {reply.error}")
        return Result(reply.images, reply.objects)

    def _await_result(self, request_id: str) -> bytes | None:
        """The worker's next signal; ``_LAPSED`` if its heartbeat stops first, None at the time limit.

        The wait is cut in slices of at most half a heartbeat, checking between them that the
        worker still beats; a result ends the wait at once, whatever the slice.
        """
        deadline = time.monotonic() + self.result_timeout
        step = min(1.0, self.heartbeat / 2)
        while (remaining := deadline - time.monotonic()) > 0:
            signal = self.relay.wait(request_id, min(step, remaining))
            if signal is not None:
                return signal
            if not self.relay.alive(request_id):
                return self.relay.poll(request_id) or _LAPSED
        return None

    def close(self) -> None:
        self.redis.close()
        self.relay.client.close()


_LAPSED = b"lapsed"
