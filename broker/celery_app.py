"""The Celery application, configured deliberately for a render farm.

Every choice here is about not losing frames and not trusting the wire: JSON only (pickle is
refused on receipt), late acknowledgement so a chunk whose worker dies goes back on the queue,
one message reserved per worker so interactive requests are not stuck behind a prefetched
batch, and queues polled in priority order so ``interactive`` always goes first.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from mlfarm.settings import Settings, get_settings

from .connection import broker_url

CHUNK_TASK = "mlfarm.chunk"
INTERACTIVE_TASK = "mlfarm.interactive"
TRAIN_TASK = "mlfarm.train"  # issue 6: one training run, on the train queue

#: Queues in the order a worker polls them: interactive requests first, then batch work.
QUEUES = ("interactive", "gpu", "cpu", "train")

#: Redis priority steps. With the Redis transport 0 is served first.
PRIORITY_STEPS = list(range(10))


def celery_priority(job_priority: int) -> int:
    """Map a Deadline-style job priority (0-100, higher first, 50 default) to a Redis step."""
    job_priority = max(0, min(100, int(job_priority)))
    return round((100 - job_priority) * (len(PRIORITY_STEPS) - 1) / 100)


def make_celery(settings: Settings | None = None, url: str | None = None) -> Celery:
    settings = settings or get_settings()
    url = url or broker_url(settings)
    app = Celery("mlfarm", broker=url, backend=url, set_as_current=False)
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "queue_order_strategy": "priority",
        "priority_steps": PRIORITY_STEPS,
        "sep": ":",
        # Sweep for chunks whose worker died every restore_interval seconds (kombu's default is ~100s).
        "unacked_restore_interval": settings.restore_interval,
        "unacked_restore_throttle": 1,
        # A broker that vanishes without closing the socket (failover, NAT) must not hang a worker.
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "socket_keepalive": True,
        "health_check_interval": 25,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        broker_transport_options=transport,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        broker_connection_retry_on_startup=True,
        # A chunk that retries (say, Redis restarted under it) republishes itself: keep trying for
        # about a minute rather than dropping the message while the broker comes back.
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0.5, "interval_step": 0.5,
                                   "interval_max": 3.0},
        broker_connection_max_retries=None,
        result_expires=settings.result_expires,
        task_time_limit=settings.chunk_time_limit(1),
        task_soft_time_limit=max(1, settings.chunk_time_limit(1) - 30),
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_default_priority=celery_priority(50),
        # No STARTED write per task: Flower gets it from events, progress comes from job records.
        task_track_started=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        timezone="UTC",
    )
    return app
