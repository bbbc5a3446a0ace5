"""Running one chunk of frames: read ahead, infer in batches, write behind.

This module holds what every kind of model shares (claiming frames, reading, writing, outcomes,
time limits); how frames reach the model is the runner's (``worker/runners/``: ``frames``,
``window``, ``sequence``), picked by the model's ``temporal`` declaration.

Reading the next frames and writing finished ones happen on a thread pool while the model works
on the current batch (OpenImageIO and OpenEXR release the GIL while they decode and encode), so a
GPU worker is not left waiting on EXR I/O. Batches are inferred on the process's lane threads: a
model that declares ``lanes`` > 1 gets that many batches in ``infer_batch`` at once, and chunks
that run side by side (``Settings.worker_threads``) share the lanes, so a model never sees more
batches at once than it declared. Each frame succeeds or fails on its own: a missing or corrupt
frame is recorded with its reason and the rest of the chunk goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlfarm.broker.jobs import CANCELLED, DONE, FAILED, JobSpec, JobStore
from mlfarm.broker.workers import able, living_workers
from mlfarm.exr import gpu as gpu_exr
from mlfarm.exr.io import read_image, sidecar_path, write_json, write_planes
from mlfarm.frames import format_frames, frame_path
from mlfarm.models.base import BaseModel
from mlfarm.settings import Settings
from mlfarm.storage import sweep_once
from mlfarm.temporal import window_reads
from mlfarm.tensors import is_tensor

from .errors import INPUT, WORKER, describe_error, failure_kind
from .frame_cache import KEY_ATTRIBUTE, FrameCache, digests
from .gpu_turns import GpuTurns, cuda_turn
from .lanes import LanePools
from .middleware import Middleware
from .model_cache import ModelCache
from .watchdog import Watchdog

log = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # of ``done``: found on the storage, not rendered
    held: list[int] = field(default_factory=list)  # handed back unstarted: the job was paused
    #: Failed here for a reason not the input's, and queued again for another worker (bad workers).
    requeued: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"done": format_frames(self.done), "failed": {str(k): v for k, v in self.failed.items()},
                "skipped": format_frames(self.skipped), "cancelled": format_frames(self.cancelled),
                "cached": format_frames(self.cached), "held": format_frames(self.held),
                "requeued": format_frames(self.requeued)}


@dataclass
class ChunkRun:
    spec: JobSpec
    frames: list[int]
    worker: str
    store: JobStore
    settings: Settings
    io: ThreadPoolExecutor
    lanes: LanePools = field(default_factory=LanePools)
    turns: GpuTurns = field(default_factory=GpuTurns)  # the process's: models with gpu_turns take them
    middleware: Sequence[Middleware] = ()
    stop: threading.Event = field(default_factory=threading.Event)  # set: stop at the next batch
    watchdog: Watchdog | None = None  # enforces MLFARM_FRAME_TIME_LIMIT on every stage
    on_stuck: Callable[[], None] | None = None  # after a stage's frames failed for time: hand the rest back
    direction: str | None = None  # a sequence model's stream: "forward" or "backward"
    enqueue: Callable[[list[int]], int] | None = None  # queues frames of this job (a sequence's next segment)
    frame_cache: FrameCache | None = None  # finds frames already rendered; None: every frame renders
    generation: int = 0  # the job's generation when this chunk was sent (JobStore.start_frames: stale)
    result: ChunkResult = field(default_factory=ChunkResult)
    stage_seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "infer": 0.0, "write": 0.0,
                                                                      "cache": 0.0})
    keys: dict[int, str] = field(default_factory=dict)  # content keys of the frames to write (frame_cache)

    claimed: list[int] = field(default_factory=list)  # frames this run took to render
    handed_back: bool = False  # its unfinished frames went back to the queue (once)
    started: float = field(default_factory=time.perf_counter)
    first_done: float | None = None  # when the first frame was written: the pipeline's ramp-up
    node: str = ""  # the Celery worker's name (``worker`` less the process id): who goes bad for a job
    _others: list[str] | None = None  # the other living workers that can take this job (asked once)
    _sent_back: int = 0  # how many of result.requeued have been enqueued

    @property
    def unfinished(self) -> list[int]:
        """Claimed frames with no outcome yet: what a chunk that dies must hand back."""
        r = self.result
        return [f for f in self.claimed
                if f not in r.failed and f not in r.done and f not in r.cancelled and f not in r.held
                and f not in r.requeued]

    @property
    def label(self) -> str:
        return format_frames(self.frames)

    # --- frame outcomes ----------------------------------------------------------------
    def _finish(self, frame: int, error: str | None, cached: bool = False) -> None:
        if error is None:
            if self.first_done is None:
                self.first_done = time.perf_counter()
            self.store.finish_frame(self.spec.id, frame, DONE, worker=self.worker, cached=cached)
            self.result.done.append(frame)
            if cached:
                self.result.cached.append(frame)
        else:
            self.store.finish_frame(self.spec.id, frame, FAILED, error, worker=self.worker)
            self.result.failed[frame] = error
        for mw in self.middleware:
            mw.after_frame(self, frame, error)

    def _fail(self, frame: int, reason: str, kind: str = INPUT, count: bool = True) -> None:
        """``kind``: whose fault (``worker/errors.py``). A ``WORKER`` failure counts against this worker
        for the job (``count``: a model that would not load counts once a chunk, not once a frame) and
        queues the frame again for another worker while one can take it (MLFARM_BAD_WORKER_FAILURES)."""
        if kind == WORKER and self.settings.bad_worker_failures > 0:
            self._worker_fault(frame, f"frame {frame}: {reason}", count)
        else:
            self._finish(frame, f"frame {frame}: {reason}")

    # --- bad workers ------------------------------------------------------------------------
    @property
    def node_name(self) -> str:
        return self.node or self.worker.rsplit(":", 1)[0]

    def other_workers(self) -> list[str]:
        """The other living workers whose queues and tags take this job (asked once a chunk)."""
        if self._others is None and self.spec.temporal == "sequence":
            self._others = []  # a stream's frame is not sent elsewhere on its own: it fails here (counted)
        if self._others is None:
            try:
                takers = able(living_workers(self.store.r), self.spec.queue, self.spec.require)
            except Exception as exc:  # without them the frame fails here, as it would have anyway
                log.warning("job %s: cannot tell which workers are alive: %s", self.spec.id, describe_error(exc))
                takers = []
            self._others = [w.name for w in takers if w.name != self.node_name]
        return self._others

    def _worker_fault(self, frame: int, reason: str, count: bool = True) -> None:
        threshold = self.settings.bad_worker_failures
        outcome, failures, recorded = self.store.fail_on_worker(
            self.spec.id, frame, reason, self.worker, self.node_name, threshold, self.other_workers(), count)
        if outcome == "requeue":
            self.result.requeued.append(frame)
            log.warning("job %s: %s; queued again for another worker (%s: %d of %d failures before it is bad "
                        "for this job)", self.spec.id, reason, self.node_name, failures, threshold)
        elif outcome == "failed":
            self.result.failed[frame] = recorded
        if failures == threshold and count:
            log.warning("job %s: worker %s is bad for this job after %d failures not caused by the input; it "
                        "takes none of its chunks any more", self.spec.id, self.node_name, failures)
        for mw in self.middleware:
            mw.after_frame(self, frame, recorded or reason)

    def _pass_on(self) -> list[int]:
        """Frames of the chunk queued again after failing on this worker, which another living worker
        that has not failed them and is not bad for the job can take: queued again for it, not tried
        here a second time. Returns them."""
        if self.settings.bad_worker_failures <= 0 or self.spec.temporal == "sequence":
            return []
        tried = self.store.tried_by(self.spec.id, self.frames)
        here = {f: workers for f, workers in tried.items() if self.node_name in workers}
        if not here:
            return []
        bad = {w["name"] for w in self.store.worker_failures(self.spec.id) if w.get("bad")}
        others = [n for n in self.other_workers() if n not in bad]
        passed = sorted(f for f, workers in here.items() if any(n not in workers for n in others))
        if passed and self.enqueue is not None:
            time.sleep(0.5)  # a moment for another worker to be the one that takes them
            self.enqueue(passed)
            self.result.skipped.extend(passed)
            log.info("job %s: frames %s failed on this worker before; queued again for another (%s)", self.spec.id,
                     format_frames(passed), ", ".join(others))
            return passed
        return []

    def send_back_requeued(self) -> None:
        """Enqueue the frames queued again for another worker (once each)."""
        frames = self.result.requeued[self._sent_back:]
        if not frames or self.enqueue is None:
            return
        self._sent_back += len(frames)
        self.enqueue(sorted(frames))

    def _turn_away(self) -> bool:
        """This worker is bad for the job: hand the chunk back to the others, or, with none left that
        can take it, fail its frames saying so. True if it did either."""
        threshold = self.settings.bad_worker_failures
        if threshold <= 0 or not self.store.is_bad(self.spec.id, self.node_name):
            return False
        failures = {w["name"]: w for w in self.store.worker_failures(self.spec.id)}
        mine = failures.get(self.node_name, {})
        good = [n for n in self.other_workers() if not failures.get(n, {}).get("bad")]
        if good and self.enqueue is not None:
            time.sleep(1.0)  # a moment for the others to take it rather than this worker again
            self.enqueue(list(self.frames))
            self.result.skipped.extend(self.frames)
            log.warning("job %s: worker %s is bad for this job (%d failures, last: %s); chunk %s handed back for "
                        "%s", self.spec.id, self.node_name, mine.get("failures", 0), mine.get("reason", ""),
                        self.label, ", ".join(good))
            return True
        claims = self.store.start_frames(self.spec.id, self.frames, self.worker, 0)
        bad = sorted(n for n, w in failures.items() if w.get("bad"))
        for f in self.frames:
            if claims.get(f) == "run":
                self.claimed.append(f)
                self._finish(f, f"frame {f}: not rendered: every living worker that can take this job is bad for it "
                                f"({', '.join(bad)}; {self.node_name}'s last failure: {mine.get('reason', '')})")
            elif claims.get(f) == "skip":
                self.result.skipped.append(f)
            elif claims.get(f) == "cancelled":
                self.result.cancelled.append(f)
        return True

    def _limit(self, frames: list[int], stage: str) -> contextlib.AbstractContextManager[None]:
        """``stage`` of ``frames`` must end within MLFARM_FRAME_TIME_LIMIT per frame (``worker/watchdog.py``).

        Per stage, not per chunk: chunks side by side share the lanes and the I/O threads, so a
        chunk's wall time says little about whether anything is stuck.
        """
        if self.watchdog is None:
            return contextlib.nullcontext()
        limit = self.settings.frame_time_limit * len(frames)
        what = f"job {self.spec.id}: {stage} of frame{'s' if len(frames) > 1 else ''} {format_frames(frames)}"
        return self.watchdog.watch(limit, what, lambda: self._stuck(frames, stage, limit))

    def _stuck(self, frames: list[int], stage: str, limit: int) -> None:
        """From the watchdog's thread: ``frames`` fail for good (until retried), the rest go back."""
        for f in frames:
            if f in self.result.done or f in self.result.failed:
                continue
            reason = (f"frame {f}: {stage} took longer than its time limit of {limit}s (MLFARM_FRAME_TIME_LIMIT); "
                      "the worker restarted to free the stuck thread")
            self.store.finish_frame(self.spec.id, f, FAILED, reason, worker=self.worker, stuck=True)
            self.result.failed[f] = reason
        if self.settings.bad_worker_failures > 0:  # the frames stay failed (a retry runs them); the worker is charged
            try:
                self.store.note_worker_failure(self.spec.id, self.node_name, f"{stage} took longer than its time "
                                               f"limit of {limit}s", self.settings.bad_worker_failures)
            except Exception:
                log.exception("job %s: could not count a time limit against worker %s", self.spec.id, self.node_name)
        if self.on_stuck is not None:
            self.on_stuck()

    # --- stages -------------------------------------------------------------------------
    def _decode_on_device(self, model: BaseModel) -> bool:
        """Whether this worker decodes plates on ``model``'s GPU (it takes them there; nvCOMP; the setting)."""
        return gpu_exr.can_decode(self.settings.exr_gpu_decode, model.torch_device)

    def _read(self, frame: int, channels: int, model: BaseModel) -> Any:
        """Read a frame and run the model's ``preprocess`` on it, both on an I/O thread."""
        t = time.perf_counter()
        try:
            with self._limit([frame], "reading"):
                device = model.torch_device if model.device_frames and self._decode_on_device(model) else None
                image = read_image(frame_path(self.spec.input, frame), half=model.half_frames, device=device)
                return model.preprocess([image.rgba(channels, view=model.raw_frames)])
        finally:
            self.stage_seconds["read"] += time.perf_counter() - t

    def _write(self, frame: int, model: BaseModel, outputs: list[Any], layout: Any = None, ready: Any = None
               ) -> None:
        """``ready``: the event ``mark_ready`` recorded after the work that made device outputs."""
        t = time.perf_counter()
        try:
            with self._limit([frame], "writing"):
                if ready is not None:
                    gpu_exr.take_over(outputs, ready)
                self._write_frame(frame, model, outputs, layout)
            self._remember(frame)
        except Exception as exc:
            reason = describe_error(exc)
            out_path = frame_path(self.spec.output, frame)
            self._fail(frame, reason if out_path in reason else f"{out_path}: {reason}", failure_kind(exc, "write"))
            return
        finally:
            self.stage_seconds["write"] += time.perf_counter() - t
        self._finish(frame, None)

    def _write_frame(self, frame: int, model: BaseModel, outputs: list[Any], layout: Any = None) -> None:
        """What ``_write`` does for one frame: postprocess, sidecar JSON, the EXR (under its time limit).

        ``layout``: the job's output planes when they are not the model's own (``outputs_for``).
        """
        outputs = model.postprocess(outputs)
        images = [o for o in outputs if isinstance(o, np.ndarray) or is_tensor(o)]
        objects = [o for o in outputs if not (isinstance(o, np.ndarray) or is_tensor(o))]
        metadata: dict[str, Any] = {
            "mlfarm/job": self.spec.id,
            "mlfarm/model": self.spec.model,
            "mlfarm/model_version": str(model.version),
            "mlfarm/options": json.dumps(self.spec.options, sort_keys=True),
            "mlfarm/source": frame_path(self.spec.input, frame),
            "mlfarm/frame": int(frame),
            **model.frame_metadata(),
        }
        if frame in self.keys:
            metadata[KEY_ATTRIBUTE] = self.keys[frame]
        if objects:
            metadata["mlfarm/objects"] = json.dumps(objects, sort_keys=True, default=str)
            if model.sidecar_json:  # written first: once the EXR appears, its sidecar is there too
                write_json(sidecar_path(frame_path(self.spec.output, frame)), self.settings.storage_root,
                           {"job": self.spec.id, "model": self.spec.model, "frame": int(frame),
                            "source": frame_path(self.spec.input, frame), "objects": objects})
        write_planes(frame_path(self.spec.output, frame), self.settings.storage_root, layout or model.outputs, images,
                     metadata, self.settings.exr_compression, self.settings.exr_rgba_half,
                     self.settings.exr_gpu_compress)

    def _remember(self, frame: int) -> None:
        """Tell the frame cache where the frame's result now is (a failure only costs a later miss)."""
        key = self.keys.get(frame)
        if key is None or self.frame_cache is None:
            return
        try:
            self.frame_cache.record(key, frame_path(self.spec.output, frame))
        except Exception as exc:
            log.warning("job %s: frame %d written but not recorded in the frame cache: %s", self.spec.id, frame,
                        describe_error(exc))

    # --- the frame cache ------------------------------------------------------------------
    @property
    def looks_up(self) -> bool:
        """Whether frames already on the storage are skipped (keys are computed either way)."""
        return self.frame_cache is not None and self.settings.cache and not self.spec.force

    def from_cache(self, model: BaseModel, todo: list[int]) -> list[int]:
        """Frames of ``todo`` whose result is on the storage are recorded done (cached); returns the
        others, whose keys (``self.keys``) go into their headers. For frames and window models: a
        frame's key covers its own input frames' content (``mlfarm.content_keys``)."""
        if self.frame_cache is None or not todo:
            return todo
        t = time.perf_counter()
        try:
            k = max(0, int(model.window)) if model.temporal == "window" else 0
            sources = (window_reads(todo, k, lambda f: os.path.isfile(frame_path(self.spec.input, f))) if k
                       else {f: [f] for f in todo})
            needed = sorted({s for frames in sources.values() for s in frames})
            found = digests({s: frame_path(self.spec.input, s) for s in needed}, self.io.submit)
            base = self.frame_cache.base(self.spec, model, model.outputs)
            for f in todo:
                key = FrameCache.frame_key(base, [found[s] for s in sources[f]])
                if key is not None:
                    self.keys[f] = key
            if not self.looks_up:
                return todo
            found_here = self.skip_found([f for f in todo if f in self.keys], model)
            return [f for f in todo if f not in found_here]
        except Exception as exc:  # the cache must never fail a frame: render them
            log.warning("job %s: frame cache unavailable for frames %s: %s", self.spec.id, format_frames(todo),
                        describe_error(exc))
            return todo
        finally:
            self.stage_seconds["cache"] += time.perf_counter() - t

    def skip_found(self, frames: list[int], model: BaseModel) -> set[int]:
        """Look up ``frames`` (keys known) on the I/O threads; those found are recorded done (cached)
        and returned."""
        assert self.frame_cache is not None
        cache = self.frame_cache
        looks = {f: self.io.submit(cache.find, self.keys[f], frame_path(self.spec.output, f), model.sidecar_json)
                 for f in frames}
        found = set()
        for f in frames:
            if looks[f].result():
                self._finish(f, None, cached=True)
                found.add(f)
        return found

    def _turn(self, model: BaseModel) -> contextlib.AbstractContextManager[None]:
        """A whole-GPU turn for a model that fills the GPU by itself (``gpu_turns``, worker/gpu_turns.py),
        on CUDA; nothing otherwise."""
        if not model.gpu_turns or not str(model.torch_device).startswith("cuda"):
            return contextlib.nullcontext()
        import torch

        return cuda_turn(self.turns, torch, model.torch_device)

    def _infer(self, model: BaseModel, batch: list[tuple[int, Any]]) -> list[tuple[int, list[Any]]]:
        """Infer a batch; if the batch fails, retry frame by frame so one bad frame fails alone."""
        t = time.perf_counter()
        try:
            try:
                with self._limit([f for f, _ in batch], f"model {self.spec.model}"), self._turn(model):
                    outs = model.infer_batch([item for _, item in batch])
                if len(outs) != len(batch):
                    raise RuntimeError(f"infer_batch returned {len(outs)} results for {len(batch)} frames")
                return [(f, list(o)) for (f, _), o in zip(batch, outs)]
            except Exception as exc:
                if len(batch) == 1:  # that frame fails alone (a worker's fault: see worker/errors.py)
                    self._fail(batch[0][0], f"model {self.spec.model}: {describe_error(exc)}",
                               failure_kind(exc, "model"))
                    return []
            ok = []
            for frame, item in batch:
                try:
                    with self._limit([frame], f"model {self.spec.model}"), self._turn(model):
                        ok.append((frame, list(model.infer_batch([item])[0])))
                except Exception as exc:
                    self._fail(frame, f"model {self.spec.model}: {describe_error(exc)}", failure_kind(exc, "model"))
            return ok
        finally:
            self.stage_seconds["infer"] += time.perf_counter() - t

    # --- the chunk ------------------------------------------------------------------------
    def run(self, cache: ModelCache) -> ChunkResult:
        for mw in self.middleware:
            mw.before_chunk(self)
        try:
            return self._run(cache)
        finally:
            for mw in self.middleware:
                mw.chunk_ended(self)

    def _run(self, cache: ModelCache) -> ChunkResult:
        if self._turn_away():
            for mw in self.middleware:
                mw.after_chunk(self)
            return self.result
        passed = set(self._pass_on())
        mine = [f for f in self.frames if f not in passed]
        claims = self.store.start_frames(self.spec.id, mine, self.worker, self.settings.max_attempts,
                                         self.generation)
        todo = self.claimed
        for f in self.frames:
            state = claims.get(f)
            if state == "run":
                todo.append(f)
            elif state in ("skip", "held", "waiting", "stale"):  # done, paused, or another message's now
                self.result.skipped.append(f)
            elif state == "cancelled":
                self.result.cancelled.append(f)
            elif state == "stuck":
                self.result.failed[f] = f"frame {f}: stuck past its time limit before; retry it to run it again"
            elif state == "giveup":
                self.result.failed[f] = f"frame {f}: gave up after {self.settings.max_attempts} attempts"
        if todo:
            sweep_once(Path(frame_path(self.spec.output, todo[0])).parent)
            self._run_frames(cache, todo)
        self.send_back_requeued()
        for mw in self.middleware:
            mw.after_chunk(self)
        return self.result

    def _run_frames(self, cache: ModelCache, todo: list[int]) -> None:
        try:
            model = cache.get(self.spec.model).with_options(self.spec.options)
        except Exception as exc:
            for i, f in enumerate(todo):  # one failure of this worker, however many frames it fails
                self._fail(f, f"model {self.spec.model} could not be loaded: {describe_error(exc)}", WORKER, i == 0)
            return
        not_ready = model.check_ready(self.settings)
        if not_ready:
            for i, f in enumerate(todo):
                self._fail(f, f"model {self.spec.model}: {not_ready}", WORKER, i == 0)
            return
        from .runners import runner_for

        if model.temporal != "sequence":  # a sequence looks up its frames in order (runners/sequence.py)
            todo = self.from_cache(model, todo)
            if not todo:
                return
        runner_for(model)(self, model, todo)

    def channels(self, model: BaseModel) -> int:
        return next(iter(model.inputs.values()), 4) or 4

    def halted_now(self, frames: list[int]) -> bool:
        """Whether the job was cancelled or paused since the chunk started: if so ``frames`` (claimed,
        not started) are recorded cancelled, or held until ``mlfarm resume``."""
        if self.store.is_cancelled(self.spec.id):
            self._cancel_rest(frames)
            return True
        if self.store.is_paused(self.spec.id):
            held = self.store.hold(self.spec.id, frames, self.worker)
            self.result.held.extend(held)
            log.info("job %s paused: frames %s held", self.spec.id, format_frames(held))
            return True
        return False

    def _cancel_rest(self, frames: list[int]) -> None:
        for f in frames:
            self.store.finish_frame(self.spec.id, f, CANCELLED, "cancelled", worker=self.worker)
            self.result.cancelled.append(f)
