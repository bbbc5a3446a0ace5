"""The yardstick: a bare Celery app with a no-op task, on the same Redis, JSON serialiser."""

import os

from celery import Celery

app = Celery("raw", broker=os.environ["RAW_BROKER_URL"], backend=os.environ["RAW_BROKER_URL"])
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                worker_prefetch_multiplier=1, task_acks_late=True, broker_connection_retry_on_startup=True)


@app.task(name="raw.noop")
def noop(i):
    return i
