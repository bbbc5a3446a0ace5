"""Celery's task consumer, made to survive a broker that vanishes while it holds messages.

When the connection to Redis breaks, Celery closes it before reconnecting, and closing asks
kombu to put back the messages the consumer took but has not acknowledged. With Redis gone and a
BRPOP in flight, kombu 5.7 gets there with a half-closed connection and raises ``AttributeError``
(``'NoneType' object has no attribute 'hostname'``), which is not a connection error: Celery
calls it unrecoverable and the worker process stops. Seen with a worker holding a chunk for later
(a retry's countdown) while Redis restarted; it would stop any worker with a free task slot.

The messages stay in kombu's unacknowledged hash either way; the reconciler queues their frames
again once no living worker holds them (broker/reconcile.py). All that is needed here is that
the worker goes on to reconnect.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer

log = logging.getLogger(__name__)


class ReconnectingConsumer(Consumer):
    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except Exception as close_exc:  # closing a broken connection: nothing left to save there
            log.warning("closing the broken broker connection failed (%s: %s); reconnecting anyway",
                        type(close_exc).__name__, close_exc)
