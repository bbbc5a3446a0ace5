"""Batches through the lanes with reads ahead and writes behind: what the frames and window runners share.

Reading the next frames and writing finished ones happen on the I/O threads while the model works
on the current batch (OpenImageIO and OpenEXR release the GIL while they decode and encode), so a
GPU worker is not left waiting on EXR I/O. Batches are inferred on the process's lane threads: a
model that declares ``lanes`` > 1 gets that many batches in ``infer_batch`` at once, and chunks
that run side by side (``Settings.worker_threads``) share the lanes, so a model never sees more
batches at once than it declared. Each frame succeeds or fails on its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from typing import Any

from mlfarm.exr.gpu import mark_ready

from ..errors import WorkerStopping, describe_error, failure_kind
from ..lanes import io_threads


class InlineExecutor(Executor):
    """Runs each call at once in the calling thread, behind the Executor interface."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def reader_for(run: Any, todo: list[int]) -> Executor:
    """One frame has no other reads to overlap with: the chunk's own thread reads it."""
    return run.io if len(todo) > 1 else InlineExecutor()


def pump(run: Any, model: Any, todo: list[int], prefetch: Callable[[int], None], resolve: Callable[[int], Any]
         ) -> None:
    """Infer ``todo`` in batches and write the results: ``prefetch(f)`` starts frame f's reads (called
    ahead, in order), ``resolve(f)`` waits for them and returns what ``infer_batch`` gets for f (its
    exception fails that frame alone)."""
    batch_size = max(1, int(model.batch_size))
    waiting = deque(todo)
    pending: deque[int] = deque()
    writes: list[Future[None]] = []
    # Always the lanes, also for a chunk of one batch: chunks running side by side must not call a
    # model from more threads than it declared, and the lanes keep what GPU libraries tune per thread.
    lanes = max(1, int(model.lanes))
    gpu: Executor = run.lanes.get(lanes)
    in_flight: deque[Future[None]] = deque()
    lookahead = max((lanes + 1) * batch_size, io_threads(run.settings))

    def infer_then_write(batch: list[tuple[int, Any]]) -> None:
        # Writes go to the I/O threads, never onto the lane that inferred them (other chunks wait there).
        done = run._infer(model, batch)
        ready = mark_ready([o for _, outputs in done for o in outputs])  # device planes: done on this stream first
        for frame, outputs in done:
            writes.append(run.io.submit(run._write, frame, model, outputs, None, ready))

    def refill() -> None:
        while waiting and len(pending) < lookahead:
            f = waiting.popleft()
            prefetch(f)
            pending.append(f)

    refill()
    checked_cancel = stopped = False
    try:
        while pending:
            batch: list[tuple[int, Any]] = []
            while pending and len(batch) < batch_size:
                frame = pending.popleft()
                refill()
                try:
                    batch.append((frame, resolve(frame)))
                except Exception as exc:
                    run._fail(frame, describe_error(exc), failure_kind(exc, "read"))
            if not batch:
                continue
            # start_frames already saw the cancel and pause flags for the first batch; later ones look again.
            if checked_cancel and run.halted_now([f for f, _ in batch] + list(pending) + list(waiting)):
                pending.clear()
                waiting.clear()
                break
            checked_cancel = True
            if run.stop.is_set():  # cold shutdown: finish what is on the lanes, hand back the rest
                pending.clear()
                waiting.clear()
                stopped = True
                break
            while len(in_flight) >= lanes:  # no more batches on the GPU at once than lanes
                in_flight.popleft().result()
            in_flight.append(gpu.submit(infer_then_write, batch))
        while in_flight:
            in_flight.popleft().result()
    finally:
        wait(in_flight)  # nothing of this chunk still running once it hands its frames back
    for w in writes:
        w.result()
    if stopped:
        raise WorkerStopping("the worker is shutting down")
