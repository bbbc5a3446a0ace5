"""The ``mlfarm.interactive`` task: one frame for the MLClient gateway, on a warm model.

Workers poll the ``interactive`` queue before batch queues, so an artist's frame waits at most
for the chunk the worker is on. The task's arguments name the request only; its pixels come
from, and go back through, Redis (see :mod:`mlfarm.gateway.relay`).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from typing import Any

from celery import Celery

from mlfarm.broker.celery_app import INTERACTIVE_TASK
from mlfarm.broker.connection import broker_url
from mlfarm.gateway.inference import run_model
from mlfarm.gateway.relay import Relay, RelayReply, raw_redis_client
from mlfarm.models.options import validate_options

from .pipeline import describe_error
from .runtime import runtime

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _relay() -> Relay:
    """One binary-safe Redis client per worker process (the runtime's client decodes to str)."""
    return Relay(raw_redis_client(broker_url(runtime().settings), timeout=60.0))


def serve_request(request_id: str, model: str, options: dict[str, Any]) -> str:
    rt, relay = runtime(), _relay()
    started = time.perf_counter()
    images = relay.take_request(request_id, rt.worker)
    if images is None:
        log.info("interactive request %s: the gateway no longer waits for it; skipped", request_id)
        return "withdrawn"
    taken = time.perf_counter()
    reply = RelayReply(worker=rt.worker)
    try:
        checked = validate_options(rt.catalog.describe(model), options)
        reply.images, reply.objects = run_model(rt.cache.get(model), checked, images)
    except Exception as exc:  # the artist gets the reason; the worker goes on
        log.warning("interactive request %s (%s) failed: %s", request_id, model, exc)
        reply = RelayReply(error=describe_error(exc), worker=rt.worker)
    inferred = time.perf_counter()
    relay.put_reply(request_id, reply)
    log.info("interactive request %s (%s): %s; take %.1f, model %.1f, reply %.1f ms", request_id, model,
             reply.error or "done", (taken - started) * 1000, (inferred - taken) * 1000,
             (time.perf_counter() - inferred) * 1000)
    return "failed" if reply.error else "done"


def register_interactive(app: Celery, policy: dict[str, Any]) -> None:
    """Same policy as chunks, but no result is stored: the reply goes to the waiting gateway."""
    @app.task(name=INTERACTIVE_TASK, **{**policy, "ignore_result": True})
    def interactive(self: Any, request_id: str, model: str, options: dict[str, Any]) -> str:
        """Infer one frame sent through the MLClient gateway (request ``request_id``)."""
        return serve_request(request_id, model, options)
