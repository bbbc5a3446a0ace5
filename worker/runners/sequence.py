"""The ``sequence`` runner: one stream of a shot, in order, carrying the model's state.

A task renders one segment of one direction (``ChunkRun.direction``): the frames it claimed, in
processing order. It starts from the nearest frame before them that was written (its planes seed
the model's state: the stream resumes where it stopped, on any worker) or, with none, from the
prompts at the stream's origin; frames on the way that were already written are stepped through
again but not rewritten. Frames are read ahead on the I/O threads and written behind, each
atomically as soon as it is done, so the job record always says how far the stream got.

The segment ends after its frames, or early when the next frame could outlast the broker's
redelivery timeout (``Settings.sequence_time_budget``); either way the task then queues the next
segment of its direction (the frames after it still queued). Only one frame of the shot is held
at a time besides the read-ahead: memory stays flat over thousands of frames.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from mlfarm.broker.jobs import DONE, QUEUED
from mlfarm.exr.gpu import mark_ready
from mlfarm.exr.io import read_planes
from mlfarm.frames import format_frames, frame_path
from mlfarm.prompts import Prompts, from_json
from mlfarm.temporal import Seed, in_order, resume_point, split, stream_origin

from ..errors import WorkerStopping, describe_error, failure_kind
from ..frame_cache import digests, header_key
from ..lanes import io_threads

log = logging.getLogger(__name__)


def _prompts(spec: Any) -> Prompts | None:
    return from_json(spec.prompts) if spec.prompts else None


def run(chunk: Any, model: Any, todo: list[int]) -> None:
    spec, direction = chunk.spec, chunk.direction
    if direction is None:
        for f in todo:
            chunk._fail(f, f"model {spec.model} runs frames in order: resubmit the job (its task had no direction)")
        return
    prompts = _prompts(spec)
    start = stream_origin(spec.frames, spec.prompts)
    layout = model.outputs_for(prompts)
    order = split(spec.frames, start).get(direction, [])
    rendering = _from_cache(chunk, model, direction, start, layout, order, todo)
    if not rendering:  # every frame of the segment was on the storage already
        _hand_on(chunk, direction, todo, order)
        return
    records = chunk.store.frame_records(spec.id)

    def written(f: int) -> bool:
        return records.get(f, {}).get("s") == DONE and os.path.isfile(frame_path(spec.output, f))

    seed_frame, path = resume_point(direction, spec.frames, start, rendering, written)
    channels = chunk.channels(model)
    seed = None
    if seed_frame is not None:
        try:
            planes = read_planes(frame_path(spec.output, seed_frame), layout)
            seed = Seed(seed_frame, planes, chunk._read(seed_frame, channels, model))
        except Exception as exc:  # the frame before cannot seed us: start over from the prompts
            log.warning("job %s: cannot resume %s from frame %d (%s); starting from the prompts", spec.id,
                        direction, seed_frame, describe_error(exc))
            seed_frame, path = resume_point(direction, spec.frames, start, rendering, lambda f: False)
    if seed_frame is not None:
        log.info("job %s: %s stream resumes after frame %d", spec.id, direction, seed_frame)
    _stream(chunk, model, todo, rendering, direction, prompts, layout, seed, path, channels, order)


def _keyframes(spec: Any, frame: int) -> list[dict[str, Any]]:
    """The prompts given on ``frame``, in their JSON form (what a frame's key covers)."""
    return [k for k in spec.prompts or () if k["frame"] == frame]


def _from_cache(chunk: Any, model: Any, direction: str, start: int, layout: Any, order: list[int],
                todo: list[int]) -> list[int]:
    """Key ``todo``'s frames (``chunk.keys``), and take those already on the storage, in order, up to
    the first that is not: the frames from there on render (the state must pass through them).
    Returns those. Keys chain along the stream (``FrameCache.chain``): a frame's key covers every
    input frame and prompt from the stream's origin up to it, so a correction on one frame re-renders
    from that frame on, resuming from the one before as any resumed stream does."""
    cache, spec = chunk.frame_cache, chunk.spec
    todo = in_order(direction, todo)
    if cache is None or not todo:
        return todo
    t = time.perf_counter()
    try:
        inputs = {f: frame_path(spec.input, f) for f in [start, *todo]}
        found = digests(inputs, chunk.io.submit)
        base = cache.base(spec, model, layout)
        previous = _key_before(chunk, cache, base, direction, start, order, todo[0], found[start])
        for f in todo:
            previous = cache.chain(previous, found[f], _keyframes(spec, f))
            if found[f] is not None:
                chunk.keys[f] = previous
        if not chunk.looks_up:
            return todo
        for i, f in enumerate(todo):
            key = chunk.keys.get(f)
            if key is None or not cache.find(key, frame_path(spec.output, f), model.sidecar_json):
                return todo[i:]
            chunk._finish(f, None, cached=True)
        return []
    except Exception as exc:  # the cache must never fail a frame: render them
        log.warning("job %s: frame cache unavailable for the %s stream: %s", spec.id, direction, describe_error(exc))
        chunk.keys.clear()
        return todo
    finally:
        chunk.stage_seconds["cache"] += time.perf_counter() - t


def _key_before(chunk: Any, cache: Any, base: str, direction: str, start: int, order: list[int], first: int,
                origin_digest: str | None) -> str:
    """The chained key of the frame before ``first`` in the stream: in that frame's header when this
    job wrote it (a segment before this one), else computed from the stream's origin."""
    spec = chunk.spec
    chain = cache.chain_start(base, direction, origin_digest, _keyframes(spec, start))
    i = order.index(first)
    if i == 0:
        return chain
    before_path = frame_path(spec.output, order[i - 1])
    done_here = chunk.store.frame_records(spec.id).get(order[i - 1], {}).get("s") == DONE
    written = header_key(before_path) if done_here and os.path.isfile(before_path) else None
    if written is not None:
        return written
    before = order[:i]
    found = digests({f: frame_path(spec.input, f) for f in before}, chunk.io.submit)
    for f in before:
        chain = cache.chain(chain, found[f], _keyframes(spec, f))
    return chain


def _stream(chunk: Any, model: Any, todo: list[int], rendering: list[int], direction: str,
            prompts: Prompts | None, layout: Any, seed: Seed | None, path: list[int], channels: int,
            order: list[int]) -> None:
    """Step ``path`` and write the frames of ``rendering`` (``todo``: the whole segment, some of it
    perhaps taken from the frame cache), then queue the next segment."""
    spec = chunk.spec
    wanted = set(rendering)
    if not path:
        return
    lane = chunk.lanes.get(max(1, int(model.lanes)))
    with chunk._limit([path[0]], f"starting model {spec.model}"):
        state = lane.submit(model.start_sequence, direction, prompts, seed).result()
    reads: deque[tuple[int, Future[Any]]] = deque()
    waiting = deque(path)
    writes: list[Future[None]] = []
    lookahead = max(2, io_threads(chunk.settings))
    budget_end = chunk.started + chunk.settings.sequence_time_budget
    slowest = 0.0
    last = None  # the last frame stepped
    stopped = cancelled = False

    def refill() -> None:
        while waiting and len(reads) < lookahead:
            f = waiting.popleft()
            reads.append((f, chunk.io.submit(chunk._read, f, channels, model)))

    refill()
    try:
        while reads:
            frame, fut = reads.popleft()
            refill()
            if chunk.halted_now([f for f in [frame, *(f for f, _ in reads), *waiting] if f in wanted]):
                cancelled = True  # or paused: the stream resumes from its last written frame
                break
            if chunk.stop.is_set():
                stopped = True
                break
            if last is not None and time.perf_counter() + 2 * slowest > budget_end:
                log.info("job %s: %s stream hands on at frame %d (redelivery timeout ahead)", spec.id, direction,
                         frame)
                break
            try:
                item = fut.result()
            except Exception as exc:  # the state goes on past a frame it cannot read
                if frame in wanted:
                    chunk._fail(frame, describe_error(exc), failure_kind(exc, "read"))
                continue
            here = prompts.at(frame) if prompts else []
            t = time.perf_counter()
            try:
                with chunk._limit([frame], f"model {spec.model}"):
                    outputs, ready = lane.submit(_step, model, state, frame, item, here).result()
            except Exception as exc:
                if frame in wanted:
                    chunk._fail(frame, f"model {spec.model}: {describe_error(exc)}", failure_kind(exc, "model"))
                continue
            finally:
                took = time.perf_counter() - t
                slowest = max(slowest, took)
                chunk.stage_seconds["infer"] += took
            last = frame
            if frame in wanted:
                writes.append(chunk.io.submit(chunk._write, frame, model, outputs, layout, ready))
    finally:
        for w in writes:
            w.result()
    if stopped:
        raise WorkerStopping("the worker is shutting down")
    if cancelled:
        return
    _hand_on(chunk, direction, todo, order)


def _step(model: Any, state: Any, frame: int, item: Any, prompts: list[Any]) -> tuple[list[Any], Any]:
    """One frame through the stream, on the lane, and the event its device outputs are ready at."""
    outputs = list(model.step(state, frame, item, prompts))
    return outputs, mark_ready(outputs)


def _hand_on(chunk: Any, direction: str, todo: list[int], order: list[int]) -> None:
    """Queue the next segment: this segment's frames not rendered (the stream ended early) and the
    frames after them in this direction (``order``: the stream's frames in processing order) that are
    still queued."""
    spec = chunk.spec
    unfinished = chunk.unfinished
    if unfinished:
        chunk.store.reclaim(spec.id, unfinished, unsent=False)  # sent just below
        chunk.handed_back = True
    records = chunk.store.frame_records(spec.id)
    after = order[order.index(in_order(direction, todo)[-1]) + 1:] if todo else []
    rest = sorted(set(unfinished) | {f for f in after if records.get(f, {}).get("s") == QUEUED})
    if rest and chunk.enqueue is not None:
        chunk.enqueue(rest)
        log.info("job %s: %s stream continues with frames %s", spec.id, direction, format_frames(rest))
