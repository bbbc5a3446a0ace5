"""Every Redis key the farm writes, and the lifetimes it gives them, in one place.

Job records, worker liveness, the published catalog, worker metrics, the reconciler's lock,
training leases and the gateway's request exchange all share one Redis: names are kept here so
two features never collide and a wrangler can find what a key is for. Kombu's own keys (queues,
``unacked``) are named where they are read (``broker/reconcile.py``).
Python 3.7 grammar: Nuke's Python imports the job records that use it.
"""

from __future__ import annotations

PREFIX = "mlfarm"

# --- jobs (broker/jobs.py) -----------------------------------------------------------------
JOBS_INDEX = PREFIX + ":jobs"
ACTIVE_JOBS = PREFIX + ":jobs:active"  # jobs that may still have frames to render (broker/reconcile.py)
JOB_TTL = 30 * 86400  # a job record's default lifetime; MLFARM_JOB_TTL sets the farm's


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def frames_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:frames"


def unsent_key(job_id: str) -> str:
    """The job's frames queued but not sent yet, in order: its next feed takes them (broker/jobs.py)."""
    return f"{PREFIX}:job:{job_id}:unsent"


def dependents_key(job_id: str) -> str:
    """The jobs that wait on ``job_id`` (``--after``, ``--after-frames``): released as its frames end."""
    return f"{PREFIX}:job:{job_id}:dependents"


def job_workers_key(job_id: str) -> str:
    """Per worker (its Celery name), the frames of this job it failed for reasons not the input's
    (model errors, a model that would not load, CUDA, out of memory, time limits) and the last
    reason: a worker with MLFARM_BAD_WORKER_FAILURES of them is bad for the job (broker/jobs.py)."""
    return f"{PREFIX}:job:{job_id}:workers"


#: Requirement queues in use (``gpu@80gb+h200``): added at submission, polled by every worker,
#: which consumes those it satisfies (broker/requirements.py).
REQUIREMENT_QUEUES = PREFIX + ":queues:require"


# --- the frame cache (worker/frame_cache.py) ----------------------------------------------------
CACHE_TTL = 90 * 86400  # how long an output stays findable by its key after it was last written or found


def cache_key(frame_key: str) -> str:
    """Where an output frame's content key points: the file that holds it, its size and digest."""
    return f"{PREFIX}:cache:{frame_key}"


# --- workers ---------------------------------------------------------------------------------
#: Each living worker process's task slots, {"n": slots, "exp": expiry}: a job's default share of
#: the farm (broker/jobs.py, feed) is twice the farm's slots.
WORKER_SLOTS = PREFIX + ":workers:slots"
ALIVE_PREFIX = PREFIX + ":alive:"  # renewed by each worker; frame records ask it who is silent
HOLDS_PREFIX = PREFIX + ":holds:"  # the task messages each worker's consumer holds
WORKER_STATS_TTL = 86400  # a gone worker's metrics linger a day for Flower and wranglers


def alive_key(worker: str) -> str:
    return ALIVE_PREFIX + worker


def holds_key(worker: str) -> str:
    return HOLDS_PREFIX + worker


def worker_stats_key(worker: str) -> str:
    return f"{PREFIX}:worker:{worker}"


WORKER_NODE_PREFIX = PREFIX + ":node:"  # what each worker is (host, GPU, tags, queues); expires with it
WORKER_NODES = PREFIX + ":nodes"  # the names of the workers that published one (expired ones are dropped on read)


def worker_node_key(node: str) -> str:
    """A worker's (its Celery name's) description, renewed with its holdings heartbeat: it expires
    MLFARM_WORKER_DEAD_AFTER after the worker stops (broker/workers.py)."""
    return WORKER_NODE_PREFIX + node


CATALOG_KEY = PREFIX + ":catalog"  # the models the workers can run, as they published them
RECONCILE_LOCK = PREFIX + ":reconcile:lock"  # the one worker that reconciles at a time


# --- training ----------------------------------------------------------------------------------
def lease_key(run: str) -> str:
    """Held (and renewed) by the one trainer of run ``run``: "JOB_ID WORKER"."""
    return f"{PREFIX}:train:lease:{run}"


# --- the gateway's request exchange (mlfarm/exchange/relay.py) ------------------------------
GATEWAY_PREFIX = PREFIX + ":gw:"
REPLY_TTL = 120  # seconds a reply waits for the gateway to collect it (it is already waiting)
