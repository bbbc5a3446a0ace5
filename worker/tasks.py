"""Celery tasks, and the policy that applies to all of them (retries, time limits) in one place."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Reject

from mlfarm.broker.celery_app import CHUNK_TASK
from mlfarm.broker.dispatch import enqueue, feed
from mlfarm.frames import format_frames, parse_frames

from .interactive import register_interactive
from .pipeline import ChunkRun
from .runtime import WorkerProcess
from .sharing import model_key
from .train_task import register_training

log = logging.getLogger(__name__)

#: Broker/Redis outages are retried with backoff; a frame's own failure is never retried
#: automatically (it is recorded with its reason and retried on request with `mlfarm retry`).
TASK_POLICY: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (redis.ConnectionError, redis.TimeoutError),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 30,
    # Progress lives in the job records; a stored result per chunk would only cost a Redis write.
    # Flower still shows each chunk's outcome, from the worker's events.
    "ignore_result": True,
}


_handing_back = threading.Lock()


def hand_back(app: Celery, rt: Any, run: ChunkRun, exc: BaseException) -> None:
    """Requeue a dead chunk's unfinished frames (max_attempts bounds how often). Once per chunk:
    its task and the watchdog (worker/watchdog.py) may both come to it."""
    with _handing_back:
        if run.handed_back:
            return
        run.handed_back = True
    try:  # frames it failed here and queued again for another worker (bad workers) need their message too
        run.send_back_requeued()
    except Exception:  # the reconciler will find them
        log.exception("job %s: could not enqueue frames queued again for another worker", run.spec.id)
    frames = run.unfinished
    if not frames:
        return
    try:
        reclaimed = rt.store.reclaim(run.spec.id, frames)
        if reclaimed:
            feed(app, rt.settings, rt.store, run.spec)
        log.warning("job %s: chunk %s stopped (%s: %s); frames %s queued again", run.spec.id, run.label,
                    type(exc).__name__, exc, format_frames(reclaimed))
    except Exception:  # the worker is going down anyway; the reconciler will find these frames
        log.exception("job %s: could not hand back frames %s", run.spec.id, format_frames(frames))


class FramesFailed(Exception):
    """Raised at the end of a chunk with failed frames, so Flower lists the chunk as failed."""


def register_tasks(app: Celery, process: WorkerProcess) -> None:
    register_interactive(app, TASK_POLICY, process)  # frames from the MLClient gateway
    register_training(app, TASK_POLICY, process)  # training runs on the train queue

    @app.task(name=CHUNK_TASK, **TASK_POLICY)
    def chunk(self: Any, job_id: str, model: str, frames: str, direction: str | None = None,
              generation: int = 0) -> dict[str, Any]:
        """Render ``frames`` (e.g. "1001-1004") of job ``job_id`` with ``model``; for a sequence model,
        the segment of its ``direction``'s stream (forward or backward) those frames are.
        ``generation``: the job's when this was sent (frames queued again since are not ours)."""
        rt = process.runtime()
        spec = rt.spec(job_id)
        run = ChunkRun(spec=spec, frames=parse_frames(frames), worker=rt.worker, store=rt.store,
                       settings=rt.settings, io=rt.io, lanes=rt.lanes, turns=rt.turns, middleware=rt.middleware,
                       stop=process.stop_now, watchdog=rt.watchdog, direction=direction, frame_cache=rt.frame_cache,
                       generation=generation, node=rt.node,
                       enqueue=functools.partial(enqueue, self.app, rt.settings, spec, generation=generation))
        # A stage past its time limit: its frames fail, the chunk's others go back to the queue, and
        # the process ends (worker/watchdog.py), since the stuck thread would otherwise never return.
        # The same hand-back releases the chunk if it is still running when the process ends.
        release = functools.partial(hand_back, self.app, rt, run,
                                    TimeoutError("the worker ended: a frame outlasted its time limit"))
        run.on_stuck = release
        # A chunk whose frames were running on a worker that died runs alone: if one of them kills
        # this worker too, no other chunk loses an attempt with it (MLFARM_MAX_ATTEMPTS).
        suspects = rt.store.interrupted(job_id, run.frames)
        if suspects:
            log.info("job %s: frames %s were running on a worker that died; chunk %s runs alone", job_id,
                     format_frames(suspects), frames)
        key = f"alone {job_id} {frames}" if suspects else model_key(model)
        with rt.watchdog.busy(release):  # until its frames are recorded
            try:
                with rt.gate.hold(key):
                    if process.stop_now.is_set():  # a cold shutdown began while this chunk waited its turn
                        raise Reject("worker shutting down", requeue=True)
                    result = run.run(rt.cache)
            except (Reject, *TASK_POLICY["autoretry_for"]):  # GateClosed too: the worker is ending
                raise  # Celery sends the chunk again; its claimed frames are claimed again then
            except BaseException as exc:
                # Anything else ends this chunk for good (Celery acknowledges a failed task): hand the
                # frames it had not finished back to the queue, or they would stay "running" forever.
                hand_back(self.app, rt, run, exc)
                raise
        if result.failed:
            reasons = "; ".join(result.failed[f] for f in sorted(result.failed))
            raise FramesFailed(f"job {job_id}: {len(result.failed)} of {len(run.frames)} frames failed "
                               f"({format_frames(sorted(result.failed))}): {reasons}")
        return result.to_dict()
