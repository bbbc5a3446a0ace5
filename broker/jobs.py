"""Job records in Redis: the single source of truth for what a job is and how far it got.

A job is a spec (what to run) plus one small state record per frame. Progress, the job's own
state and ETA are derived from the frame records, never from Celery results, so a redelivered,
retried or cancelled chunk can never make the counts disagree with the files. Every state
change is one Lua script, atomic on the server.
"""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from mlfarm.keys import ACTIVE_JOBS, JOB_TTL, JOBS_INDEX, frames_key, job_key, job_workers_key

from .liveness import dead
from .requirements import describe as describe_requirement
from .workers import able, living_workers

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FRAME_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
#: Not a state of its own: a done frame whose output was already on the storage (the frame cache,
#: ``worker/frame_cache.py``). Counted apart from ``done`` in ``JobStatus.counts``.
CACHED = "cached"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class JobSpec:
    """What to run. Stored as JSON; carries no pixel data."""

    model: str
    input: str
    output: str
    frames: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    chunk: int = 4
    priority: int = 50
    queue: str = "gpu"
    model_version: str = ""
    name: str = ""
    kind: str = "render"  # "train": frames are epochs, one task trains them all
    temporal: str = "frames"  # how the model sees time (mlfarm.temporal): frames, window or sequence
    prompts: list[dict[str, Any]] | None = None  # promptable models: mlfarm.prompts' JSON form
    force: bool = False  # render every frame, even those whose exact result is already on the storage
    # Tags and fact comparisons a worker must meet to take its chunks (broker/requirements.py):
    # --require plus the model's own; its chunks go to the requirement's queue.
    require: list[str] = field(default_factory=list)
    id: str = field(default_factory=new_job_id)
    user: str = field(default_factory=getpass.getuser)
    host: str = field(default_factory=socket.gethostname)
    created: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))


@dataclass
class FrameState:
    frame: int
    state: str
    reason: str = ""
    attempts: int = 0
    worker: str = ""
    started: float | None = None
    ended: float | None = None
    cached: bool = False  # done by finding its exact result on the storage, not by rendering it


@dataclass
class JobStatus:
    spec: JobSpec
    state: str
    counts: dict[str, int]
    frames: list[FrameState]
    started: float | None
    ended: float | None
    progress: dict[str, Any] = field(default_factory=dict)  # a training job's step, loss...
    silent: list[str] = field(default_factory=list)  # workers holding running frames, heartbeat gone
    #: Workers that failed frames of this job for reasons not the input's: name, failures, last
    #: reason, and whether that made them bad for it (MLFARM_BAD_WORKER_FAILURES).
    workers: list[dict[str, Any]] = field(default_factory=list)
    waiting: str = ""  # why queued frames wait: no living worker can take them

    @property
    def bad_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers if w.get("bad")]

    @property
    def total(self) -> int:
        return len(self.frames)

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    @property
    def stalled(self) -> int:
        """Running frames held by a worker that stopped responding (``silent``)."""
        return sum(1 for f in self.frames if f.state == RUNNING and f.worker in self.silent)

    @property
    def failed_frames(self) -> list[FrameState]:
        return [f for f in self.frames if f.state == FAILED]

    def eta_seconds(self, now: float | None = None) -> float | None:
        done = self.counts[DONE] + self.counts[CACHED] + self.counts[FAILED]
        if not self.started or done == 0 or self.finished:
            return None
        elapsed = (now or time.time()) - self.started
        remaining = self.total - done - self.counts[CANCELLED]
        return elapsed / done * remaining

    def summary(self) -> str:
        c = self.counts
        unit = " epochs" if self.spec.kind == "train" else ""
        line = f"job {self.spec.id} {self.state}: {c[DONE] + c[CACHED]}/{self.total}{unit} done"
        if c[CACHED]:
            line += f" ({c[CACHED]} cached, {c[DONE]} rendered)"
        line += f", {c[FAILED]} failed"
        if c[CANCELLED]:
            line += f", {c[CANCELLED]} cancelled"
        if c[QUEUED] or c[RUNNING]:
            line += f", {c[RUNNING]} running, {c[QUEUED]} queued"
        if self.silent:
            line += (f" ({self.stalled} on {', '.join(self.silent)}, which stopped responding: they are "
                     "queued again within MLFARM_WORKER_DEAD_AFTER)")
        if self.waiting:
            line += f"; {self.waiting}"
        if self.bad_workers:
            line += "; bad workers: " + ", ".join(w["name"] for w in self.bad_workers)
        if self.progress.get("total_steps"):
            line += f"; step {self.progress.get('step', 0)}/{self.progress['total_steps']}"
            if self.progress.get("loss") is not None:
                line += f", loss {self.progress['loss']:.4g}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.spec.id,
            "state": self.state,
            "model": self.spec.model,
            "total": self.total,
            "counts": self.counts,
            "started": self.started,
            "ended": self.ended,
            "eta_seconds": self.eta_seconds(),
            "output": self.spec.output,
            "failed": [{"frame": f.frame, "reason": f.reason, "attempts": f.attempts} for f in self.failed_frames],
            "spec": asdict(self.spec),
            "progress": self.progress,
            "silent_workers": self.silent,
            "bad_workers": self.bad_workers,
            "worker_failures": self.workers,
            "waiting": self.waiting,
        }


def worker_failures(raw: dict[str, str]) -> list[dict[str, Any]]:
    """A job's workers hash as a list: name, failures, last reason, when, bad."""
    out = []
    for name, text in sorted(raw.items()):
        try:
            rec = json.loads(text)
        except ValueError:
            continue
        out.append({"name": name, "failures": int(rec.get("n", 0)), "reason": rec.get("r", ""),
                    "last": rec.get("t"), "bad": bool(rec.get("bad"))})
    return out


class JobNotFound(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r} (unknown id, or its record expired)"


# --- Lua: every transition is atomic on the server ------------------------------------------
# KEYS[1] job hash, KEYS[2] frames hash. Frame records are JSON objects.

_START = """
local cancelled = redis.call('HGET', KEYS[1], 'cancelled') == '1'
local max_attempts = tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV do
  local f = ARGV[i]
  local raw = redis.call('HGET', KEYS[2], f)
  if not raw then
    out[#out + 1] = 'unknown'
  else
    local rec = cjson.decode(raw)
    if rec.s == 'done' then
      out[#out + 1] = 'skip'
    elseif cancelled or rec.s == 'cancelled' then
      rec.s = 'cancelled'
      redis.call('HSET', KEYS[2], f, cjson.encode(rec))
      out[#out + 1] = 'cancelled'
    elseif rec.s == 'failed' and rec.k == 1 then
      out[#out + 1] = 'stuck'
    elseif max_attempts > 0 and (rec.a or 0) - (rec.b or 0) >= max_attempts then
      rec.s = 'failed'
      rec.r = 'frame ' .. f .. ': gave up after ' .. ((rec.a or 0) - (rec.b or 0)) ..
              ' attempts that each ended without a result ' ..
              '(the worker was killed, crashed or stopped every time)'
      rec.t1 = tonumber(ARGV[2])
      redis.call('HSET', KEYS[2], f, cjson.encode(rec))
      out[#out + 1] = 'giveup'
    else
      rec.s = 'running'
      rec.a = (rec.a or 0) + 1
      rec.i = nil
      rec.w = ARGV[1]
      rec.t0 = tonumber(ARGV[2])
      rec.r = ''
      redis.call('HSET', KEYS[2], f, cjson.encode(rec))
      out[#out + 1] = 'run'
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return out
"""

_FINISH = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec.s == 'done' and ARGV[2] ~= 'done' then return 0 end
rec.s = ARGV[2]
rec.r = ARGV[3]
rec.w = ARGV[4]
rec.t1 = tonumber(ARGV[5])
if ARGV[6] == '1' then rec.k = 1 else rec.k = nil end
if ARGV[7] == '1' then rec.c = 1 else rec.c = nil end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(rec))
redis.call('HSET', KEYS[1], 'updated', ARGV[5])
return 1
"""

_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'cancelled', '1')
local n = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec.s == 'queued' then
    rec.s = 'cancelled'
    redis.call('HSET', KEYS[2], all[i], cjson.encode(rec))
    n = n + 1
  end
end
return n
"""

_REQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local wanted = {}
for i = 3, #ARGV do wanted[ARGV[i]] = true end
redis.call('HDEL', KEYS[1], 'cancelled')
local out = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if wanted[rec.s] then
    rec.s = 'queued'
    rec.r = ''
    rec.b = rec.a or 0  -- a retry is a new go: the attempt cap counts from here, 'a' keeps the total
    rec.k = nil
    rec.i = nil
    rec.x = nil  -- the workers that failed it: a retry gives each a new chance
    rec.q = tonumber(ARGV[2])
    redis.call('HSET', KEYS[2], all[i], cjson.encode(rec))
    out[#out + 1] = all[i]
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return out
"""

# Frames whose chunk message was lost (see broker/reconcile.py), or that were running on a worker
# that died (broker/liveness.py): back to queued, unless they finished meanwhile or another worker
# took them. KEYS as above; ARGV[1] now, ARGV[2] the dead worker ('' for lost messages), whose
# frames are marked interrupted (``i``: their chunk runs alone, see JobStore.interrupted), ARGV[3..]
# frames.
_RECLAIM = """
local dead = ARGV[2]
local out = {}
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local rec = cjson.decode(raw)
    local take
    if dead == '' then take = rec.s == 'queued' or rec.s == 'running'
    else take = rec.s == 'running' and rec.w == dead end
    if take then
      rec.s = 'queued'
      rec.q = tonumber(ARGV[1])
      if dead ~= '' then rec.i = 1 end
      redis.call('HSET', KEYS[2], ARGV[i], cjson.encode(rec))
      out[#out + 1] = ARGV[i]
    end
  end
end
return out
"""


# A frame failed on a worker for a reason that is not its input's (a model error, a model that would
# not load, CUDA, out of memory): the worker's count for the job goes up (ARGV[8] '1'), and the
# frame is queued again for another worker while a living one that can take the job (ARGV[9..])
# has neither failed this frame nor gone bad for the job; else it fails, saying so. Such an attempt
# does not count against max_attempts (b). KEYS job, frames, the job's workers hash. ARGV[1] frame,
# [2] reason, [3] worker process, [4] worker (node), [5] now, [6] threshold (0: never bad, never
# elsewhere), [7] ttl, [8] count it, [9..] other living workers able to take the job.
_WORKER_FAULT = """
local threshold = tonumber(ARGV[6])
local node = ARGV[4]
local wraw = redis.call('HGET', KEYS[3], node)
local w = {n = 0}
if wraw then w = cjson.decode(wraw) end
if ARGV[8] == '1' then w.n = (w.n or 0) + 1 end
w.r = ARGV[2]
w.t = tonumber(ARGV[5])
local bad = threshold > 0 and w.n >= threshold
if bad then w.bad = 1 end
redis.call('HSET', KEYS[3], node, cjson.encode(w))
redis.call('EXPIRE', KEYS[3], ARGV[7])
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return {'unknown', w.n, ''} end
local rec = cjson.decode(raw)
if rec.s == 'done' then return {'skip', w.n, ''} end
local tried = {}
local seen = false
if type(rec.x) == 'table' then
  for _, n in ipairs(rec.x) do
    tried[#tried + 1] = n
    if n == node then seen = true end
  end
end
if not seen then tried[#tried + 1] = node end
rec.x = tried
local cancelled = redis.call('HGET', KEYS[1], 'cancelled') == '1'
local others = #ARGV - 8
local left = 0
if threshold > 0 and not cancelled then
  for i = 9, #ARGV do
    local mine = false
    for _, n in ipairs(tried) do if n == ARGV[i] then mine = true end end
    if not mine then
      local oraw = redis.call('HGET', KEYS[3], ARGV[i])
      local on = 0
      if oraw then on = cjson.decode(oraw).n or 0 end
      if on < threshold then left = left + 1 end
    end
  end
end
rec.w = ARGV[3]
rec.t1 = tonumber(ARGV[5])
rec.k = nil
if left > 0 then
  rec.s = 'queued'
  rec.r = ''
  rec.lr = ARGV[2]
  rec.b = (rec.b or 0) + 1
  rec.q = tonumber(ARGV[5])
  rec.i = nil
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(rec))
  return {'requeue', w.n, ''}
end
local reason = ARGV[2]
if threshold > 0 and not cancelled then
  if others > 0 then
    reason = reason .. ' (failed on ' .. table.concat(tried, ', ') .. ': every living worker that can take ' ..
             'this job has failed this frame or is bad for the job)'
  elseif bad then
    reason = reason .. ' (' .. node .. ' is bad for this job after ' .. w.n .. ' such failures, and no other ' ..
             'living worker can take it)'
  end
end
rec.s = 'failed'
rec.r = reason
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(rec))
redis.call('HSET', KEYS[1], 'updated', ARGV[5])
return {'failed', w.n, reason}
"""

# A failure charged to a worker without touching frames (a frame past its time limit, recorded
# apart): KEYS[1] the job's workers hash; ARGV node, reason, now, ttl, threshold.
_NOTE_FAULT = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local w = {n = 0}
if raw then w = cjson.decode(raw) end
w.n = (w.n or 0) + 1
w.r = ARGV[2]
w.t = tonumber(ARGV[3])
if tonumber(ARGV[5]) > 0 and w.n >= tonumber(ARGV[5]) then w.bad = 1 end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(w))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return w.n
"""


class JobStore:
    """Reads and changes job records. Safe to share between threads."""

    def __init__(self, client: redis.Redis, ttl: int = JOB_TTL):
        self.r = client
        self.ttl = ttl
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._requeue = client.register_script(_REQUEUE)
        self._reclaim = client.register_script(_RECLAIM)
        self._worker_fault = client.register_script(_WORKER_FAULT)
        self._note_fault = client.register_script(_NOTE_FAULT)

    # --- creating and reading ------------------------------------------------------------
    def create(self, spec: JobSpec) -> None:
        initial = json.dumps({"s": QUEUED, "a": 0, "q": time.time()})
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(job_key(spec.id), mapping={"spec": spec.to_json(), "updated": time.time()})
        pipe.hset(frames_key(spec.id), mapping={str(f): initial for f in spec.frames})
        pipe.expire(job_key(spec.id), self.ttl)
        pipe.expire(frames_key(spec.id), self.ttl)
        pipe.zadd(JOBS_INDEX, {spec.id: spec.created})
        pipe.sadd(ACTIVE_JOBS, spec.id)
        pipe.execute()

    def spec(self, job_id: str) -> JobSpec:
        raw = self.r.hget(job_key(job_id), "spec")
        if raw is None:
            raise JobNotFound(job_id)
        return JobSpec.from_json(raw)

    def status(self, job_id: str) -> JobStatus:
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(job_key(job_id))
        pipe.hgetall(frames_key(job_id))
        pipe.hgetall(job_workers_key(job_id))
        job, raw_frames, raw_workers = pipe.execute()
        if not job or "spec" not in job:
            raise JobNotFound(job_id)
        spec = JobSpec.from_json(job["spec"])
        frames = []
        for f in spec.frames:
            rec = json.loads(raw_frames.get(str(f), '{"s": "queued"}'))
            frames.append(FrameState(frame=f, state=rec.get("s", QUEUED), reason=rec.get("r", ""),
                                     attempts=rec.get("a", 0), worker=rec.get("w", ""),
                                     started=rec.get("t0"), ended=rec.get("t1"),
                                     cached=rec.get("s") == DONE and rec.get("c") == 1))
        counts = {s: 0 for s in (*FRAME_STATES, CACHED)}
        for fs in frames:
            key = CACHED if fs.cached else fs.state
            counts[key] = counts.get(key, 0) + 1
        starts = [f.started for f in frames if f.started]
        ends = [f.ended for f in frames if f.ended]
        cancelled = job.get("cancelled") == "1"
        if counts[QUEUED] or counts[RUNNING]:
            state = "cancelling" if cancelled else (RUNNING if starts else QUEUED)
        elif counts[FAILED]:
            state = FAILED
        elif counts[CANCELLED]:
            state = CANCELLED
        else:
            state = DONE
        finished = state in (DONE, FAILED, CANCELLED)
        workers = worker_failures(raw_workers)
        return JobStatus(spec=spec, state=state, counts=counts, frames=frames,
                         started=min(starts) if starts else None,
                         ended=max(ends) if ends and finished else None,
                         progress=json.loads(job.get("progress") or "{}"),
                         silent=sorted(dead(self.r, {f.worker for f in frames if f.state == RUNNING and f.worker})),
                         workers=workers,
                         waiting=self.waiting(spec, workers) if counts[QUEUED] and not cancelled else "")

    def waiting(self, spec: JobSpec, failures: list[dict[str, Any]] | None = None) -> str:
        """Why a job's queued frames wait, when no living worker can take them; else ""."""
        living = living_workers(self.r)
        takers = able(living, spec.queue, spec.require)
        bad = {w["name"] for w in failures or () if w.get("bad")}
        if any(w.name not in bad for w in takers):
            return ""
        n = len(living)
        some = f"none of the {n} living worker{'s' if n != 1 else ''}"
        if not living:
            return "waiting for a worker: none is running"
        if spec.require and not takers:
            return f"waiting for a worker with {describe_requirement(spec.require)} ({some} has them)"
        if not takers:
            return f"waiting for a worker that takes queue {spec.queue} ({some} does)"
        names = ", ".join(sorted(w.name for w in takers))
        return f"waiting for a worker: every living worker that can take it is bad for this job ({names})"

    def worker_failures(self, job_id: str) -> list[dict[str, Any]]:
        return worker_failures(self.r.hgetall(job_workers_key(job_id)))

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """Record how far a training job is (step, loss...); shown by status beside the epoch counts."""
        self.r.pipeline(transaction=True).hset(job_key(job_id), mapping={
            "progress": json.dumps(progress, sort_keys=True), "updated": time.time()}).expire(
            job_key(job_id), self.ttl).execute()

    def is_cancelled(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "cancelled") == "1"

    def list_jobs(self, limit: int = 20) -> list[str]:
        ids = self.r.zrevrange(JOBS_INDEX, 0, limit * 2)
        alive = [i for i in ids if self.r.exists(job_key(i))]
        stale = set(ids[: limit * 2]) - set(alive)
        if stale:
            self.r.zrem(JOBS_INDEX, *stale)
        return alive[:limit]

    # --- transitions -------------------------------------------------------------------
    def start_frames(self, job_id: str, frames: list[int], worker: str, max_attempts: int = 0
                     ) -> dict[int, str]:
        """Claim frames for a worker. Returns per frame: run, skip (already done), cancelled, unknown,
        stuck (failed by outlasting its time limit, until retried), or giveup: the frame already had
        ``max_attempts`` attempts (0: no limit) and is now failed."""
        result = self._start(keys=[job_key(job_id), frames_key(job_id)],
                             args=[worker, time.time(), self.ttl, max_attempts, *[str(f) for f in frames]])
        return dict(zip(frames, result))

    def interrupted(self, job_id: str, frames: list[int]) -> list[int]:
        """Frames whose record still says running, or that were queued again from a worker that
        died in them: a worker died in them (or is rendering them still). A chunk of such frames is
        a suspect: its frames may be what killed that worker."""
        raw = self.r.hmget(frames_key(job_id), [str(f) for f in frames])
        records = [(f, json.loads(rec)) for f, rec in zip(frames, raw) if rec]
        return [f for f, rec in records if rec.get("s") == RUNNING or rec.get("i") == 1]

    def finish_frame(self, job_id: str, frame: int, state: str, reason: str = "", worker: str = "",
                     stuck: bool = False, cached: bool = False) -> None:
        """``stuck``: the frame failed by outlasting its time limit; a redelivered chunk does not try it
        again (it would only take down another worker), a retry does. ``cached``: done, by finding
        its exact result on the storage."""
        if state not in (DONE, FAILED, CANCELLED):
            raise ValueError(f"a frame cannot finish as {state!r}")
        self._finish(keys=[job_key(job_id), frames_key(job_id)],
                     args=[str(frame), state, reason, worker, time.time(), "1" if stuck else "0",
                           "1" if cached and state == DONE else "0"])

    def fail_on_worker(self, job_id: str, frame: int, reason: str, worker: str, node: str, threshold: int,
                       others: list[str], count: bool = True) -> tuple[str, int, str]:
        """Frame ``frame`` failed on ``node`` (process ``worker``) for a reason not its input's.
        ``others``: the other living workers that can take the job. Returns (outcome, the node's
        failures for the job, the reason recorded): ``requeue`` (queued again for another worker:
        the caller enqueues it), ``failed`` or ``skip`` (done meanwhile). ``count``: whether this
        failure counts towards the node going bad (a model that would not load counts once a chunk)."""
        out = self._worker_fault(keys=[job_key(job_id), frames_key(job_id), job_workers_key(job_id)],
                                 args=[str(frame), reason, worker, node, time.time(), threshold, self.ttl,
                                       "1" if count else "0", *others])
        return str(out[0]), int(out[1]), str(out[2])

    def note_worker_failure(self, job_id: str, node: str, reason: str, threshold: int) -> int:
        """Count a failure against ``node`` for the job without touching frames; returns its count."""
        return int(self._note_fault(keys=[job_workers_key(job_id)],
                                    args=[node, reason, time.time(), self.ttl, threshold]))

    def tried_by(self, job_id: str, frames: list[int]) -> dict[int, list[str]]:
        """Of ``frames``, those queued again after failing on workers for reasons not their input's,
        with those workers."""
        raw = self.r.hmget(frames_key(job_id), [str(f) for f in frames])
        records = [(f, json.loads(rec)) for f, rec in zip(frames, raw) if rec]
        return {f: list(rec["x"]) for f, rec in records if rec.get("s") == QUEUED and isinstance(rec.get("x"), list)}

    def is_bad(self, job_id: str, node: str) -> bool:
        raw = self.r.hget(job_workers_key(job_id), node)
        return bool(raw and json.loads(raw).get("bad"))

    def cancel(self, job_id: str) -> int:
        """Cancel what has not started; running frames stop at the next frame boundary."""
        n = self._cancel(keys=[job_key(job_id), frames_key(job_id)])
        if n < 0:
            raise JobNotFound(job_id)
        return n

    def frame_records(self, job_id: str) -> dict[int, dict[str, Any]]:
        """The raw per-frame records (state ``s``, queued-at ``q``, started ``t0``...)."""
        return {int(f): json.loads(raw) for f, raw in self.r.hgetall(frames_key(job_id)).items()}

    def reclaim(self, job_id: str, frames: list[int], dead_worker: str = "") -> list[int]:
        """Mark frames whose messages were lost, or (``dead_worker``) that were running on a worker
        that died, as queued again; returns those it changed."""
        out = self._reclaim(keys=[job_key(job_id), frames_key(job_id)],
                            args=[time.time(), dead_worker, *map(str, frames)])
        return sorted(int(f) for f in out)

    def requeue(self, job_id: str, states: tuple[str, ...]) -> list[int]:
        """Put frames in ``states`` back to queued; the caller enqueues their chunks."""
        out = self._requeue(keys=[job_key(job_id), frames_key(job_id)], args=[self.ttl, time.time(), *states])
        if out == -1:
            raise JobNotFound(job_id)
        self.r.delete(job_workers_key(job_id))  # a retry gives bad workers a new chance too
        if out:
            self.r.sadd(ACTIVE_JOBS, job_id)
        order = {f: i for i, f in enumerate(self.spec(job_id).frames)}
        return sorted((int(f) for f in out), key=lambda f: order.get(f, f))
