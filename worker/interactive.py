"""The ``mlfarm.interactive`` task: one frame for the MLClient gateway, on a warm model.

Workers poll the ``interactive`` queue before batch queues, so an artist's frame waits at most
for the chunks the worker is on (see ``sharing``). The task's arguments name the request only; its
pixels come from, and go back through, Redis or files on shared storage, whichever way the gateway
sent them (see :mod:`mlfarm.exchange.relay`). While it works on a request the worker keeps a heartbeat key
alive, so that the waiting gateway learns within seconds if this process dies.
"""

from __future__ import annotations

import contextlib
import logging
import time
from functools import lru_cache
from typing import Any

from celery import Celery

from mlfarm.broker.celery_app import INTERACTIVE_TASK
from mlfarm.broker.connection import broker_url
from mlfarm.exchange.inference import run_model
from mlfarm.exchange.relay import Relay, RelayReply, raw_redis_client
from mlfarm.exchange.spool import Spool
from mlfarm.models.options import validate_options

from .errors import describe_error
from .heartbeat import beating
from .runtime import Runtime, WorkerProcess

log = logging.getLogger(__name__)


def _relay(settings: Any) -> Relay:
    """A binary-safe Redis client (the runtime's client decodes to str): one per worker process."""
    return Relay(raw_redis_client(broker_url(settings), timeout=60.0), Spool(settings.storage_root))


def _heartbeat(relay: Relay, request_id: str, seconds: float) -> contextlib.AbstractContextManager[None]:
    """Renew the request's heartbeat three times per its life while the block runs."""
    return beating(lambda: relay.beat(request_id, seconds), seconds / 3, f"interactive request {request_id}")


def serve_request(rt: Runtime, relay: Relay, request_id: str, model: str, options: dict[str, Any],
                  heartbeat: float) -> str:
    started = time.perf_counter()
    request = relay.take_request(request_id, rt.worker, heartbeat)
    if request is None:
        log.info("interactive request %s: the gateway no longer waits for it; skipped", request_id)
        return "withdrawn"
    with _heartbeat(relay, request_id, heartbeat):
        taken = time.perf_counter()
        reply = RelayReply(error=request.error, worker=rt.worker)
        if request.error is None:
            try:
                checked = validate_options(rt.catalog.describe(model), options)
                limit = rt.settings.frame_time_limit
                stuck = RelayReply(error=f"model {model} took longer than its time limit of {limit}s "
                                         "(MLFARM_FRAME_TIME_LIMIT); the worker restarted", worker=rt.worker)
                spooled = request.spooled
                # Alone: run_model calls the model from this thread, outside the chunks' lanes.
                with rt.watchdog.busy(), rt.gate.hold(f"interactive {request_id}"), rt.watchdog.watch(
                        limit, f"interactive request {request_id} ({model})",
                        lambda: relay.put_reply(request_id, stuck, spooled)):
                    reply.images, reply.objects = run_model(rt.cache.get(model), checked, request.images)
            except Exception as exc:  # the artist gets the reason; the worker goes on
                reply = RelayReply(error=describe_error(exc), worker=rt.worker)
        if reply.error:
            log.warning("interactive request %s (%s) failed: %s", request_id, model, reply.error)
        spooled = request.spooled
        del request  # unmaps the request's frame file before the result is written
        inferred = time.perf_counter()
        relay.put_reply(request_id, reply, spooled)
    log.info("interactive request %s (%s): %s; take %.1f, model %.1f, reply %.1f ms", request_id, model,
             reply.error or "done", (taken - started) * 1000, (inferred - taken) * 1000,
             (time.perf_counter() - inferred) * 1000)
    return "failed" if reply.error else "done"


def register_interactive(app: Celery, policy: dict[str, Any], process: WorkerProcess) -> None:
    """Same policy as chunks, but no result is stored: the reply goes to the waiting gateway."""
    relay = lru_cache(maxsize=1)(lambda: _relay(process.settings))  # made in the process that serves

    @app.task(name=INTERACTIVE_TASK, **{**policy, "ignore_result": True})
    def interactive(self: Any, request_id: str, model: str, options: dict[str, Any],
                    heartbeat: float | None = None) -> str:
        """Infer one frame sent through the MLClient gateway (request ``request_id``)."""
        rt = process.runtime()
        return serve_request(rt, relay(), request_id, model, options, heartbeat or rt.settings.gateway_heartbeat)
