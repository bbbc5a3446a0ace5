"""The farm's public client API: submit a shot, follow it, cancel it, retry its failures.

Behind ``mlfarm submit``/``status``/``cancel``/``retry``, the Nuke panel, the demo, the gateway's
tests and the benchmarks; scripts use it the same way::

    from mlfarm.client import Farm, SubmitError

    farm = Farm()                      # settings from MLFARM_* / mlfarm.toml, the farm's Redis
    spec = farm.submit("blur", "/shots/sh010/plate.####.exr",
                       "/farm/sh010/ml/blur/v001/sh010_blur_v001.####.exr",
                       frames=range(1001, 1101), options={"radius": 4})
    status = farm.status(spec.id)      # JobStatus: state, counts, failed frames with reasons
    farm.cancel(spec.id)               # queued frames dropped, running ones stop at their next batch
    farm.retry(spec.id)                # failed and cancelled frames queued again; done ones stay
    farm.pause(spec.id); farm.resume(spec.id)  # queued frames held, then queued again; none lost
    mattes = farm.submit("sam2", ..., after_frames=spec.id)  # frame f once frame f of spec is done

Everything is checked before anything is queued: the model exists, every option has the right
type, choice and range, the patterns expand, the output lies under the storage root and the
chunk fits the broker's redelivery timeout. A refused submission raises ``SubmitError`` (its
message says what to change) and leaves no trace on the farm.

``JobSpec`` (what was submitted) and ``JobStatus`` (where it stands) are re-exported here, with
the frame states, so callers need not know the broker's modules. Nuke's Python (3.7) imports
this module: keep its grammar and its imports light (no torch, numpy or OpenImageIO).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mlfarm.broker.celery_app import make_celery
from mlfarm.broker.connection import broker_url, redis_client
from mlfarm.broker.dependencies import DependencyError, check_dependencies, release
from mlfarm.broker.dispatch import feed
from mlfarm.broker.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    HELD,
    QUEUED,
    RUNNING,
    WAITING,
    JobNotFound,
    JobSpec,
    JobStatus,
    JobStore,
    new_job_id,
)
from mlfarm.broker.registry import read_catalog
from mlfarm.broker.requirements import RequirementError, normalise, queue_for, register_queue
from mlfarm.broker.workers import WorkerInfo, list_workers
from mlfarm.frames import PatternError, check_pattern, frame_path
from mlfarm.models.options import validate_options
from mlfarm.prompts import PromptError, Prompts, check_prompts
from mlfarm.settings import Settings, get_settings
from mlfarm.storage import StorageError, confined_path

__all__ = ["CANCELLED", "DONE", "FAILED", "HELD", "QUEUED", "RUNNING", "WAITING", "Farm", "JobNotFound", "JobSpec",
           "JobStatus", "SubmitError", "WorkerInfo"]

log = logging.getLogger(__name__)


class SubmitError(ValueError):
    """A submission refused before anything was queued; the message says what to change."""


class Farm:
    """A connection to one farm (its Redis) for submitting and following jobs."""

    def __init__(self, settings: Settings | None = None, url: str | None = None, timeout: float | None = None):
        """``timeout``: for a client someone waits on (Nuke's interface), every call to the farm gives
        up after this many seconds, without retries; by default calls ride out short hiccups."""
        self.settings = settings or get_settings()
        self.url = url or broker_url(self.settings)
        self.timeout = timeout
        if timeout is None:
            self.redis = redis_client(self.url)
        else:
            self.redis = redis_client(self.url, timeout=timeout, retries=0)
        self.store = JobStore(self.redis, self.settings.job_ttl)
        self._app = None

    @property
    def app(self):
        if self._app is None:
            self._app = make_celery(self.settings, self.url)
            if self.timeout is not None:
                conf = self._app.conf
                conf.broker_transport_options = dict(conf.broker_transport_options, socket_timeout=self.timeout,
                                                     socket_connect_timeout=self.timeout)
                conf.broker_connection_timeout = self.timeout
                conf.broker_connection_max_retries = 0
                conf.task_publish_retry_policy = {"max_retries": 0}
        return self._app

    # --- catalog -----------------------------------------------------------------------
    def catalog(self, include_local: bool = True) -> dict[str, dict[str, Any]]:
        """Models as the farm's workers published them; this machine's model folders fill gaps.

        Nuke passes ``include_local=False``: importing model plugins there could pull in torch.
        """
        published = read_catalog(self.redis)
        if not include_local:
            return published
        try:
            from mlfarm.models.catalog import Catalog
        except ImportError:  # a thin client (Nuke) without the model plugins installed
            return published
        local = Catalog.from_settings(self.settings).describe_all()
        return {**local, **published}

    def describe(self, model: str, include_local: bool = True) -> dict[str, Any]:
        catalog = self.catalog(include_local)
        if model not in catalog:
            raise SubmitError("unknown model %r (available: %s)" % (model, ", ".join(sorted(catalog)) or "none"))
        return catalog[model]

    # --- submitting ----------------------------------------------------------------------
    def check_ready(self, model: str, options: Mapping[str, Any]) -> None:
        """Ask the model itself, where this machine has it, whether it can run (e.g. has its weights).

        Workers ask the same question before each chunk and fail the frames with the same reason,
        which covers a client (Nuke) that has no model folders.
        """
        try:
            from mlfarm.models.catalog import Catalog
        except ImportError:
            return
        catalog = Catalog.from_settings(self.settings)
        if model not in catalog.entries:
            return
        instance = catalog.entry(model).create().with_options(options)
        reason = instance.check_ready(self.settings)
        if reason:
            raise SubmitError("model %s: %s" % (model, reason))

    def check_output(self, pattern: str) -> None:
        root = self.settings.storage_root
        try:
            confined_path(os.path.dirname(os.path.abspath(pattern)) or ".", root)
        except StorageError as exc:
            raise SubmitError(str(exc)) from None

    def submit(self, model: str, input: str, output: str, frames: Sequence[int],
               options: Mapping[str, Any] | None = None, chunk: int | None = None, priority: int = 50,
               name: str = "", include_local: bool = True, prompts: Prompts | None = None,
               image_size: tuple[int, int] | None = None, force: bool = False,
               after: Sequence[str] = (), after_frames: str = "", max_workers: int = 0,
               job_id: str | None = None, require: Sequence[str] | str | None = None) -> JobSpec:
        """Queue ``frames`` of ``input`` through ``model`` into ``output``; SubmitError says why not.

        ``options`` are checked and typed against the model's description; ``chunk`` frames go in
        one task (default MLFARM_DEFAULT_CHUNK; for a sequence model the frames one task renders
        of its stream before handing on, default MLFARM_SEQUENCE_SEGMENT); higher ``priority``
        (0-100) runs first. A promptable model (SAM 2) needs ``prompts`` (``mlfarm.prompts``),
        checked against the frames and the image (``image_size`` as (width, height), else read from
        the input's header where OpenImageIO is installed). Frames whose exact result is already on
        the storage are not rendered again (the frame cache) unless ``force``.

        ``after``: jobs that must be done before any frame is queued (the job waits, nothing sent to
        Celery); ``after_frames``: a job whose frame f must be done before frame f is queued (and
        its neighbours, for a window model); unknown jobs and cycles are refused. ``max_workers``:
        at most this many chunks of the job in flight at once (0: its share of the farm).
        ``job_id``: a pipeline's own id for the job (default: a new random one).
        ``require``: tags (``80gb``) or worker facts (``gpu_memory_gb>=24``) a worker must have to
        take its chunks, besides those the model declares (its ``requires``).
        """
        desc = self.describe(model, include_local)
        typed = validate_options(desc, dict(options or {}))
        if include_local:
            self.check_ready(model, typed)
        try:
            check_pattern(input)
            check_pattern(output)
        except PatternError as exc:
            raise SubmitError(str(exc)) from None
        if not frames:
            raise SubmitError("no frames to render")
        if os.path.abspath(frame_path(input, frames[0])) == os.path.abspath(frame_path(output, frames[0])):
            raise SubmitError("the output pattern %s would overwrite the input frames" % output)
        self.check_output(output)
        self._check_prompts(model, desc, prompts, input, list(frames), image_size)
        temporal = str(desc.get("temporal", "frames"))
        if temporal == "sequence":  # its tasks end their segment before the redelivery timeout themselves
            chunk = chunk or self.settings.sequence_segment
        else:
            chunk = chunk or self.settings.default_chunk
            if chunk > self.settings.max_chunk:
                raise SubmitError(
                    "a chunk of %d frames could outlast the broker's redelivery timeout (%ds at %ds a frame); "
                    "use --chunk %d or less, or raise MLFARM_VISIBILITY_TIMEOUT"
                    % (chunk, self.settings.visibility_timeout, self.settings.frame_time_limit,
                       self.settings.max_chunk))
        if chunk < 1:
            raise SubmitError("--chunk must be at least 1")
        if not 0 <= priority <= 100:
            raise SubmitError("priority must be between 0 and 100")
        if max_workers < 0:
            raise SubmitError("--max-workers must be 0 (no limit) or more")
        after = [a for a in dict.fromkeys(str(a).strip() for a in after) if a]
        if after_frames and temporal == "sequence":
            raise SubmitError("model %s runs a shot's frames in order: it can wait on a whole job (--after), not "
                              "frame by frame (--after-frames)" % model)
        try:
            required = normalise(list(normalise(require)) + list(desc.get("requires") or ()))
        except RequirementError as exc:
            raise SubmitError(str(exc)) from None
        spec = JobSpec(model=model, input=os.path.abspath(input), output=os.path.abspath(output),
                       frames=list(frames), options=typed, chunk=chunk, priority=priority,
                       queue="cpu" if desc.get("device") == "cpu" else "gpu",
                       model_version=str(desc.get("version", "")), name=name, temporal=temporal,
                       prompts=prompts.to_json() if prompts is not None else None, force=bool(force),
                       after=after, after_frames=after_frames,
                       after_reach=int(desc.get("window", 0)) if after_frames and temporal == "window" else 0,
                       max_workers=int(max_workers), id=job_id or new_job_id(), require=required)
        if job_id is not None and self.store.exists(job_id):
            raise SubmitError("a job %s exists already" % job_id)
        try:
            check_dependencies(self.store, spec)
        except DependencyError as exc:
            raise SubmitError(str(exc)) from None
        self.store.create(spec)
        register_queue(self.redis, queue_for(spec.queue, spec.require))  # before its chunks: workers subscribe
        if spec.after or spec.after_frames:
            released = release(self.app, self.settings, self.store, spec)
            log.info("job %s: %d frames of %s, %d released now, the rest wait on %s", spec.id, len(spec.frames),
                     model, len(released), ", ".join(spec.after + [spec.after_frames] if spec.after_frames
                                                     else spec.after))
        else:
            tasks = feed(self.app, self.settings, self.store, spec)
            log.info("job %s: %d frames of %s, %d tasks sent", spec.id, len(spec.frames), model, tasks)
        return spec

    def _check_prompts(self, model: str, desc: Mapping[str, Any], prompts: Prompts | None, input: str,
                       frames: list[int], image_size: tuple[int, int] | None) -> None:
        if not desc.get("promptable"):
            if prompts is not None:
                raise SubmitError("model %s takes no prompts" % model)
            return
        if prompts is None:
            raise SubmitError("model %s needs prompts: mark each object with points or a box on a frame "
                              "(--prompt FRAME:NAME:box=x0,y0,x1,y1, or a prompts JSON file)" % model)
        try:
            check_prompts(prompts, frames, (float("inf"), float("inf")))  # the frames first: they are read next
            size = image_size or _image_size(frame_path(input, prompts.frames[0]))
            if size is not None:
                check_prompts(prompts, frames, size)
        except PromptError as exc:
            raise SubmitError("prompts: %s" % exc) from None

    # --- following and changing jobs -----------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        """Where the job stands; JobNotFound once its record expired (MLFARM_JOB_TTL) or never was."""
        return self.store.status(job_id)

    def cancel(self, job_id: str) -> int:
        """Cancel the job's frames not yet done; returns how many were cancelled."""
        return self.store.cancel(job_id)

    def retry(self, job_id: str, failed_only: bool = False) -> list[int]:
        """Requeue failed frames (and, unless ``failed_only``, cancelled ones); done frames stay. A job
        that waits on others waits again for what is not done there."""
        states = (FAILED,) if failed_only else (FAILED, CANCELLED)
        spec = self.store.spec(job_id)
        depends = bool(spec.after or spec.after_frames)
        frames = self.store.requeue(job_id, states, to=WAITING if depends else QUEUED)
        if frames:
            if depends:
                release(self.app, self.settings, self.store, spec)
            else:
                feed(self.app, self.settings, self.store, spec)
        return frames

    def pause(self, job_id: str) -> int:
        """Hold the job: queued frames are neither run nor lost, running chunks finish the frame they
        are on and hold the rest (a sequence stops at a frame boundary). Returns the frames held now."""
        return self.store.pause(job_id)

    def resume(self, job_id: str) -> int:
        """Queue a paused job's held frames again (a sequence goes on from its last written frame);
        returns how many."""
        n = self.store.resume(job_id)
        feed(self.app, self.settings, self.store, self.store.spec(job_id))
        return n

    def workers(self) -> list[WorkerInfo]:
        """The living workers: host, GPU, tags, models loaded, the jobs they render, frames done and
        failed in the last hour, last heartbeat (``mlfarm workers``)."""
        return list_workers(self.redis)

    def jobs(self, limit: int = 20) -> list[JobStatus]:
        return [self.store.status(j) for j in self.store.list_jobs(limit)]


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from an image's header, or None where that cannot be read here (Nuke's Python
    has no OpenImageIO; it passes the size it knows)."""
    try:
        import OpenImageIO as oiio
    except ImportError:
        return None
    inp = oiio.ImageInput.open(path)
    if inp is None:
        raise SubmitError("cannot read %s to check the prompts against it: %s" % (path, oiio.geterror()))
    try:
        spec = inp.spec()
        return int(spec.width), int(spec.height)
    finally:
        inp.close()
