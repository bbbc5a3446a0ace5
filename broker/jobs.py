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

from mlfarm.frames import format_frames
from mlfarm.keys import (
    ACTIVE_JOBS,
    JOB_TTL,
    JOBS_INDEX,
    WORKER_SLOTS,
    dependents_key,
    frames_key,
    job_key,
    job_workers_key,
    unsent_key,
)

from .liveness import dead
from .requirements import describe as describe_requirement
from .workers import able, living_workers

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
#: Not queued to Celery yet: the jobs it waits on (``--after``, ``--after-frames``) are not done.
WAITING = "waiting"
#: Held by ``mlfarm pause``: neither run nor lost; ``mlfarm resume`` queues them again.
HELD = "held"
FRAME_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED, WAITING, HELD)
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
    after: list[str] = field(default_factory=list)  # jobs that must be done before any frame is queued
    after_frames: str = ""  # a job whose frame f (and its ``after_reach`` neighbours) must be done before f
    after_reach: int = 0  # neighbours each frame needs of ``after_frames`` (a window model's k)
    max_workers: int = 0  # at most this many chunks in flight at once (0: no limit but the farm's share)
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
    paused: bool = False
    #: What the waiting frames wait on: {"job", "state", "frames" (frame-by-frame: those not done yet)}.
    waiting_on: list[dict[str, Any]] = field(default_factory=list)
    #: Workers that failed frames of this job for reasons not the input's: name, failures, last
    #: reason, and whether that made them bad for it (MLFARM_BAD_WORKER_FAILURES).
    workers: list[dict[str, Any]] = field(default_factory=list)
    no_worker: str = ""  # why queued frames wait: no living worker can take them

    @property
    def bad_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers if w.get("bad")]

    @property
    def total(self) -> int:
        return len(self.frames)

    @property
    def completed(self) -> int:
        """Frames whose result is on the storage: rendered (``done``) or found there (``cached``).

        A worker killed between renaming a frame's output into place and recording it leaves a
        whole file with the frame's key; the frame's next attempt finds it and counts it cached.
        """
        return self.counts[DONE] + self.counts[CACHED]

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
        done = self.completed + self.counts[FAILED]
        if not self.started or done == 0 or self.finished:
            return None
        elapsed = (now or time.time()) - self.started
        remaining = self.total - done - self.counts[CANCELLED]
        return elapsed / done * remaining

    def summary(self) -> str:
        c = self.counts
        unit = " epochs" if self.spec.kind == "train" else ""
        line = f"job {self.spec.id} {self.state}: {self.completed}/{self.total}{unit} done"
        if c[CACHED]:
            line += f" ({c[CACHED]} cached, {c[DONE]} rendered)"
        line += f", {c[FAILED]} failed"
        if c[CANCELLED]:
            line += f", {c[CANCELLED]} cancelled"
        if c[QUEUED] or c[RUNNING]:
            line += f", {c[RUNNING]} running, {c[QUEUED]} queued"
        if c[HELD]:
            line += f", {c[HELD]} held (paused: mlfarm resume {self.spec.id})"
        if c[WAITING]:
            line += f", {c[WAITING]} waiting"
            if self.waiting_on:
                line += " on " + "; ".join(describe_wait(w) for w in self.waiting_on)
        if self.silent:
            line += (f" ({self.stalled} on {', '.join(self.silent)}, which stopped responding: they are "
                     "queued again within MLFARM_WORKER_DEAD_AFTER)")
        if self.no_worker:
            line += f"; {self.no_worker}"
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
            "paused": self.paused,
            "waiting_on": self.waiting_on,
            "bad_workers": self.bad_workers,
            "worker_failures": self.workers,
            "no_worker": self.no_worker,
        }


def describe_wait(wait: dict[str, Any]) -> str:
    """One thing a job waits on, as ``status`` says it: "job ab12 (failed: retry it)"."""
    job, state = wait["job"], wait["state"]
    what = f"frames {wait['frames']} of job {job}" if wait.get("frames") else f"job {job}"
    if state in (FAILED, CANCELLED):
        return f"{what} ({state}: mlfarm retry {job} to go on)"
    if state == "expired":
        return f"{what} (its record expired or was removed: this job cannot be released)"
    return f"{what} ({state})"


def job_state(counts: dict[str, int], cancelled: bool, paused: bool, started: bool) -> str:
    """A job's state from its frames' counts and its flags: one rule for ``status`` and ``state``."""
    active = counts[QUEUED] + counts[RUNNING] + counts[HELD] + counts[WAITING]
    if cancelled and (counts[QUEUED] or counts[RUNNING]):
        return "cancelling"
    if paused and active:
        return "pausing" if counts[RUNNING] else "paused"
    if counts[QUEUED] or counts[RUNNING]:
        return RUNNING if started else QUEUED
    if counts[HELD]:
        return "paused"
    if counts[WAITING]:
        return WAITING
    if counts[FAILED]:
        return FAILED
    if counts[CANCELLED]:
        return CANCELLED
    return DONE


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
# KEYS[1] job hash, KEYS[2] frames hash, KEYS[3] the job's unsent frames (a sorted set). Frame
# records are JSON objects: s state, a attempts (b: at the last retry), q queued at, t0/t1 started
# and ended, w worker, r reason, k stuck past its time limit, i interrupted (its worker died), c
# found in the frame cache, g generation (messages sent before it are stale), u unsent (queued, no
# message yet: the job's next feed sends it), f fed (sent by a feed and not finished: in flight).
#
# So that feeding a job costs the same on a 10,000-frame shot as on a short one, the job hash
# counts its frames in flight (``inflight``) and waiting (``waiting``), and the unsent frames are
# kept in order in KEYS[3]; every script keeps them true through the helpers below, and the
# reconciler recounts them now and then from the records (``_RECOUNT``).
_HELPERS = """
local function left_flight(rec)
  if rec.f == 1 then rec.f = nil; redis.call('HINCRBY', KEYS[1], 'inflight', -1) end
end
local function left_unsent(f, rec)
  if rec.u == 1 then rec.u = nil; redis.call('ZREM', KEYS[3], f) end
end
local function left_queue(f, rec)
  left_flight(rec)
  left_unsent(f, rec)
  if rec.s == 'waiting' then redis.call('HINCRBY', KEYS[1], 'waiting', -1) end
end
local function to_unsent(f, rec)
  left_flight(rec)
  if rec.u ~= 1 then rec.u = 1; redis.call('ZADD', KEYS[3], tonumber(f), f) end
end
"""

_START = _HELPERS + """
local cancelled = redis.call('HGET', KEYS[1], 'cancelled') == '1'
local max_attempts = tonumber(ARGV[4])
local gen = tonumber(ARGV[5])
local out = {}
for i = 6, #ARGV do
  local f = ARGV[i]
  local raw = redis.call('HGET', KEYS[2], f)
  if not raw then
    out[#out + 1] = 'unknown'
  else
    local rec = cjson.decode(raw)
    if rec.s == 'done' then
      out[#out + 1] = 'skip'
    elseif (rec.s == 'held' or rec.s == 'waiting') and not cancelled then
      out[#out + 1] = rec.s
    elseif (rec.g or 0) > gen and rec.s ~= 'cancelled' and not cancelled then
      out[#out + 1] = 'stale'
    elseif cancelled or rec.s == 'cancelled' then
      left_queue(f, rec)
      rec.s = 'cancelled'
      redis.call('HSET', KEYS[2], f, cjson.encode(rec))
      out[#out + 1] = 'cancelled'
    elseif rec.s == 'failed' and rec.k == 1 then
      out[#out + 1] = 'stuck'
    elseif max_attempts > 0 and (rec.a or 0) - (rec.b or 0) >= max_attempts then
      left_queue(f, rec)
      rec.s = 'failed'
      rec.r = 'frame ' .. f .. ': gave up after ' .. ((rec.a or 0) - (rec.b or 0)) ..
              ' attempts that each ended without a result ' ..
              '(the worker was killed, crashed or stopped every time)'
      rec.t1 = tonumber(ARGV[2])
      redis.call('HSET', KEYS[2], f, cjson.encode(rec))
      out[#out + 1] = 'giveup'
    else
      if rec.u == 1 then  -- claimed before its feed: in flight now
        left_unsent(f, rec)
        rec.f = 1
        redis.call('HINCRBY', KEYS[1], 'inflight', 1)
      end
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

_FINISH = _HELPERS + """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec.s == 'done' and ARGV[2] ~= 'done' then return 0 end
left_queue(ARGV[1], rec)
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

_CANCEL = _HELPERS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'cancelled', '1')
local n = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec.s == 'queued' or rec.s == 'waiting' or rec.s == 'held' then
    left_queue(all[i], rec)
    rec.s = 'cancelled'
    redis.call('HSET', KEYS[2], all[i], cjson.encode(rec))
    n = n + 1
  end
end
return n
"""

# Retry: ARGV[1] ttl, ARGV[2] now, ARGV[3] the state they go to (queued, or waiting for a job
# that depends on others), ARGV[4] '1': unsent (the caller feeds the job), ARGV[5..] the states taken.
_REQUEUE = _HELPERS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local wanted = {}
for i = 5, #ARGV do wanted[ARGV[i]] = true end
redis.call('HDEL', KEYS[1], 'cancelled')
local out = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if wanted[rec.s] then
    local running = rec.s == 'running'
    rec.s = ARGV[3]
    if rec.s == 'waiting' then
      left_flight(rec)
      left_unsent(all[i], rec)
      redis.call('HINCRBY', KEYS[1], 'waiting', 1)
    elseif ARGV[4] == '1' then
      to_unsent(all[i], rec)
    elseif not running then
      left_unsent(all[i], rec)
    end
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
redis.call('EXPIRE', KEYS[3], ARGV[1])
return out
"""

# Frames whose chunk message was lost (see broker/reconcile.py), or that were running on a worker
# that died (broker/liveness.py): back to queued, unless they finished meanwhile or another worker
# took them. ARGV[1] now, ARGV[2] the dead worker ('' for lost messages), whose frames are marked
# interrupted (``i``: their chunk runs alone, see JobStore.interrupted), ARGV[3] '1': they go out
# with the job's next feed (``u``), ARGV[4..] frames. A dead worker's frames get a new generation:
# its chunk message, redelivered an hour later, is stale for them.
_RECLAIM = _HELPERS + """
local dead = ARGV[2]
local gen = nil
local out = {}
for i = 4, #ARGV do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local rec = cjson.decode(raw)
    local take
    if dead == '' then take = rec.s == 'queued' or rec.s == 'running'
    else take = rec.s == 'running' and rec.w == dead end
    if take then
      rec.s = 'queued'
      rec.q = tonumber(ARGV[1])
      if dead ~= '' then
        if gen == nil then gen = redis.call('HINCRBY', KEYS[1], 'gen', 1) end
        rec.i = 1
        rec.g = gen
      end
      if ARGV[3] == '1' then to_unsent(ARGV[i], rec) else left_unsent(ARGV[i], rec) end
      redis.call('HSET', KEYS[2], ARGV[i], cjson.encode(rec))
      out[#out + 1] = ARGV[i]
    end
  end
end
return out
"""


# Sending a job's unsent frames within its share of the farm. KEYS[4] the workers' task slots
# (WORKER_SLOTS). ARGV[1] now, ARGV[2] the chunk, ARGV[3] the job's limit in chunks (0: twice the
# living workers' slots, at least 2), ARGV[4] '1': every unsent frame at once (a sequence's streams,
# a training run), ARGV[5] ttl. Returns {generation, frames...}: the frames to send, now in flight.
# A part of a chunk goes only when nothing of the job is in flight or nothing waits any more, so
# frames released one by one (--after-frames) still go out in whole chunks. Costs the frames it
# sends, not the job's length.
_FEED = _HELPERS + """
if redis.call('HGET', KEYS[1], 'cancelled') == '1' or redis.call('HGET', KEYS[1], 'paused') == '1' then
  return {0}
end
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local unsent = redis.call('ZCARD', KEYS[3])
if unsent == 0 then return {gen} end
local chunk = tonumber(ARGV[2])
local take = unsent
if ARGV[4] ~= '1' then
  local inflight = math.max(0, tonumber(redis.call('HGET', KEYS[1], 'inflight') or '0'))
  local waiting = tonumber(redis.call('HGET', KEYS[1], 'waiting') or '0')
  local limit = tonumber(ARGV[3])
  if limit <= 0 then
    local slots = 0
    local now = tonumber(ARGV[1])
    local workers = redis.call('HGETALL', KEYS[4])
    for i = 1, #workers, 2 do
      local w = cjson.decode(workers[i + 1])
      if tonumber(w.exp) > now then slots = slots + tonumber(w.n) end
    end
    limit = math.max(2, 2 * slots)
  end
  local room = (limit - math.ceil(inflight / chunk)) * chunk
  take = math.min(unsent, math.max(room, 0))
  if take < unsent or waiting > 0 then take = take - take % chunk end
  if take == 0 and inflight == 0 then take = math.min(unsent, chunk) end
end
local out = {gen}
if take == 0 then return out end
local frames = redis.call('ZRANGE', KEYS[3], 0, take - 1)
for _, f in ipairs(frames) do
  local raw = redis.call('HGET', KEYS[2], f)
  if raw then
    local rec = cjson.decode(raw)
    rec.u = nil
    if rec.s == 'queued' then
      if rec.f ~= 1 then rec.f = 1; redis.call('HINCRBY', KEYS[1], 'inflight', 1) end
      out[#out + 1] = f
    end
    redis.call('HSET', KEYS[2], f, cjson.encode(rec))
  end
  redis.call('ZREM', KEYS[3], f)
end
redis.call('EXPIRE', KEYS[3], ARGV[5])
return out
"""

# Pausing: queued frames are held; running ones finish (their chunk holds the rest, ``_HOLD``).
# Returns how many were held, -1 for an unknown job.
_PAUSE = _HELPERS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'paused', '1')
local n = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec.s == 'queued' then
    left_queue(all[i], rec)
    rec.s = 'held'
    redis.call('HSET', KEYS[2], all[i], cjson.encode(rec))
    n = n + 1
  end
end
return n
"""

# Resuming: held frames are queued, unsent, in a new generation (chunk messages sent before the
# pause are stale for them). ARGV[1] now. Returns how many, -1 for an unknown job.
_RESUME = _HELPERS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HDEL', KEYS[1], 'paused')
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
local n = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  if rec.s == 'held' then
    rec.s = 'queued'
    to_unsent(all[i], rec)
    rec.g = gen
    rec.q = tonumber(ARGV[1])
    redis.call('HSET', KEYS[2], all[i], cjson.encode(rec))
    n = n + 1
  end
end
return n
"""

# A chunk of a paused job stops at a frame boundary: ARGV[1] the worker, ARGV[2..] the frames it
# claimed and did not finish. Those still running there are held. Returns them.
_HOLD = _HELPERS + """
local out = {}
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local rec = cjson.decode(raw)
    if rec.s == 'running' and rec.w == ARGV[1] then
      left_queue(ARGV[i], rec)
      rec.s = 'held'
      rec.a = math.max(0, (rec.a or 1) - 1)  -- not an attempt: the frame was never started
      redis.call('HSET', KEYS[2], ARGV[i], cjson.encode(rec))
      out[#out + 1] = ARGV[i]
    end
  end
end
return out
"""

# Frames whose dependencies are done: waiting -> queued, unsent. ARGV[1] now, ARGV[2..] frames.
_RELEASE = _HELPERS + """
local out = {}
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    local rec = cjson.decode(raw)
    if rec.s == 'waiting' then
      redis.call('HINCRBY', KEYS[1], 'waiting', -1)
      rec.s = 'queued'
      to_unsent(ARGV[i], rec)
      rec.q = tonumber(ARGV[1])
      redis.call('HSET', KEYS[2], ARGV[i], cjson.encode(rec))
      out[#out + 1] = ARGV[i]
    end
  end
end
return out
"""

# The counts the job hash keeps, and its unsent set, recounted from the records (the reconciler,
# now and then: whatever a lost write or an old record left wrong is right again). ARGV[1] ttl.
_RECOUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local inflight, waiting = 0, 0
redis.call('DEL', KEYS[3])
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local rec = cjson.decode(all[i + 1])
  local changed = false
  if rec.s == 'queued' and rec.u == 1 then
    redis.call('ZADD', KEYS[3], tonumber(all[i]), all[i])
  elseif rec.u == 1 then
    rec.u = nil; changed = true
  end
  if rec.f == 1 then
    if (rec.s == 'queued' and rec.u ~= 1) or rec.s == 'running' then inflight = inflight + 1
    else rec.f = nil; changed = true end
  end
  if rec.s == 'waiting' then waiting = waiting + 1 end
  if changed then redis.call('HSET', KEYS[2], all[i], cjson.encode(rec)) end
end
redis.call('HSET', KEYS[1], 'inflight', inflight, 'waiting', waiting)
redis.call('EXPIRE', KEYS[3], ARGV[1])
return inflight
"""

# A frame failed on a worker for a reason that is not its input's (a model error, a model that would
# not load, CUDA, out of memory): the worker's count for the job goes up (ARGV[8] '1'), and the
# frame is queued again for another worker while a living one that can take the job (ARGV[9..])
# has neither failed this frame nor gone bad for the job; else it fails, saying so. Such an attempt
# does not count against max_attempts (b). A frame queued again stays in flight: the worker sends it
# straight back (ChunkRun.send_back_requeued). KEYS job, frames, unsent, the job's workers hash. ARGV[1] frame,
# [2] reason, [3] worker process, [4] worker (node), [5] now, [6] threshold (0: never bad, never
# elsewhere), [7] ttl, [8] count it, [9..] other living workers able to take the job.
_WORKER_FAULT = _HELPERS + """
local threshold = tonumber(ARGV[6])
local node = ARGV[4]
local wraw = redis.call('HGET', KEYS[4], node)
local w = {n = 0}
if wraw then w = cjson.decode(wraw) end
if ARGV[8] == '1' then w.n = (w.n or 0) + 1 end
w.r = ARGV[2]
w.t = tonumber(ARGV[5])
local bad = threshold > 0 and w.n >= threshold
if bad then w.bad = 1 end
redis.call('HSET', KEYS[4], node, cjson.encode(w))
redis.call('EXPIRE', KEYS[4], ARGV[7])
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
      local oraw = redis.call('HGET', KEYS[4], ARGV[i])
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
left_queue(ARGV[1], rec)
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
        self._feed = client.register_script(_FEED)
        self._pause = client.register_script(_PAUSE)
        self._resume = client.register_script(_RESUME)
        self._hold = client.register_script(_HOLD)
        self._release = client.register_script(_RELEASE)
        self._recount = client.register_script(_RECOUNT)
        self._worker_fault = client.register_script(_WORKER_FAULT)
        self._note_fault = client.register_script(_NOTE_FAULT)

    @staticmethod
    def _keys(job_id: str) -> list[str]:
        return [job_key(job_id), frames_key(job_id), unsent_key(job_id)]

    # --- creating and reading ------------------------------------------------------------
    def create(self, spec: JobSpec, unsent: bool = True) -> None:
        """Record a new job. Its frames wait when it depends on other jobs; else they are queued and
        ``unsent``: the next ``feed`` sends them (False: the caller sends them itself)."""
        now = time.time()
        waits = bool(spec.after or spec.after_frames)
        if waits:
            initial = json.dumps({"s": WAITING, "a": 0, "q": now})
        else:
            initial = json.dumps({"s": QUEUED, "a": 0, "q": now, **({"u": 1} if unsent else {})})
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(job_key(spec.id), mapping={"spec": spec.to_json(), "updated": now, "inflight": 0,
                                             "waiting": len(spec.frames) if waits else 0})
        pipe.hset(frames_key(spec.id), mapping={str(f): initial for f in spec.frames})
        if unsent and not waits:
            pipe.zadd(unsent_key(spec.id), {str(f): f for f in spec.frames})
            pipe.expire(unsent_key(spec.id), self.ttl)
        pipe.expire(job_key(spec.id), self.ttl)
        pipe.expire(frames_key(spec.id), self.ttl)
        pipe.zadd(JOBS_INDEX, {spec.id: spec.created})
        pipe.sadd(ACTIVE_JOBS, spec.id)
        for parent in {*spec.after, *([spec.after_frames] if spec.after_frames else [])}:
            pipe.sadd(dependents_key(parent), spec.id)
            pipe.expire(dependents_key(parent), self.ttl)
        pipe.execute()

    def exists(self, job_id: str) -> bool:
        return bool(self.r.hexists(job_key(job_id), "spec"))

    def dependents(self, job_id: str) -> list[str]:
        """Jobs that wait on ``job_id`` (``--after`` or ``--after-frames``)."""
        return sorted(self.r.smembers(dependents_key(job_id)))

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
        paused, cancelled = job.get("paused") == "1", job.get("cancelled") == "1"
        state = job_state(counts, cancelled, paused, bool(starts))
        finished = state in (DONE, FAILED, CANCELLED)
        workers = worker_failures(raw_workers)
        return JobStatus(spec=spec, state=state, counts=counts, frames=frames,
                         started=min(starts) if starts else None,
                         ended=max(ends) if ends and finished else None,
                         progress=json.loads(job.get("progress") or "{}"),
                         silent=sorted(dead(self.r, {f.worker for f in frames if f.state == RUNNING and f.worker})),
                         paused=paused,
                         waiting_on=self._waiting_on(spec, frames) if counts[WAITING] else [],
                         workers=workers,
                         no_worker=self.no_worker(spec, workers) if counts[QUEUED] and not cancelled else "")

    def state(self, job_id: str) -> str:
        """A job's state alone (as ``status`` derives it), without the per-frame detail."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(job_key(job_id), ["spec", "cancelled", "paused"])
        pipe.hvals(frames_key(job_id))
        (spec, cancelled, paused), records = pipe.execute()
        if spec is None:
            raise JobNotFound(job_id)
        counts = {s: 0 for s in (*FRAME_STATES, CACHED)}
        started = False
        for raw in records:
            rec = json.loads(raw)
            counts[rec.get("s", QUEUED)] = counts.get(rec.get("s", QUEUED), 0) + 1
            started = started or bool(rec.get("t0"))
        return job_state(counts, cancelled == "1", paused == "1", started)

    def _waiting_on(self, spec: JobSpec, frames: list[FrameState]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for parent in spec.after:
            try:
                state = self.state(parent)
            except JobNotFound:
                state = "expired"
            if state != DONE:
                out.append({"job": parent, "state": state})
        if spec.after_frames:
            try:
                parent_state = self.state(spec.after_frames)
                records = self.frame_records(spec.after_frames)
            except JobNotFound:
                return [*out, {"job": spec.after_frames, "state": "expired"}]
            waiting = [f.frame for f in frames if f.state == WAITING]
            needed = sorted({g for f in waiting for g in range(f - spec.after_reach, f + spec.after_reach + 1)
                             if g in records and records[g].get("s") != DONE})
            if needed:
                out.append({"job": spec.after_frames, "state": parent_state, "frames": format_frames(needed)})
        return out

    def no_worker(self, spec: JobSpec, failures: list[dict[str, Any]] | None = None) -> str:
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
    def start_frames(self, job_id: str, frames: list[int], worker: str, max_attempts: int = 0,
                     generation: int = 0) -> dict[int, str]:
        """Claim frames for a worker. Returns per frame: run, skip (already done), cancelled, unknown,
        stuck (failed by outlasting its time limit, until retried), giveup: the frame already had
        ``max_attempts`` attempts (0: no limit) and is now failed; held (the job is paused), waiting
        (on another job), or stale: the frame was queued again after this message was sent
        (``generation``: the message's), by a resume or from a dead worker, and another message has it."""
        result = self._start(keys=self._keys(job_id),
                             args=[worker, time.time(), self.ttl, max_attempts, generation,
                                   *[str(f) for f in frames]])
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
        self._finish(keys=self._keys(job_id),
                     args=[str(frame), state, reason, worker, time.time(), "1" if stuck else "0",
                           "1" if cached and state == DONE else "0"])

    def fail_on_worker(self, job_id: str, frame: int, reason: str, worker: str, node: str, threshold: int,
                       others: list[str], count: bool = True) -> tuple[str, int, str]:
        """Frame ``frame`` failed on ``node`` (process ``worker``) for a reason not its input's.
        ``others``: the other living workers that can take the job. Returns (outcome, the node's
        failures for the job, the reason recorded): ``requeue`` (queued again for another worker:
        the caller enqueues it), ``failed`` or ``skip`` (done meanwhile). ``count``: whether this
        failure counts towards the node going bad (a model that would not load counts once a chunk)."""
        out = self._worker_fault(keys=[*self._keys(job_id), job_workers_key(job_id)],
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
        n = self._cancel(keys=self._keys(job_id))
        if n < 0:
            raise JobNotFound(job_id)
        return n

    def frame_records(self, job_id: str) -> dict[int, dict[str, Any]]:
        """The raw per-frame records (state ``s``, queued-at ``q``, started ``t0``...)."""
        return {int(f): json.loads(raw) for f, raw in self.r.hgetall(frames_key(job_id)).items()}

    def reclaim(self, job_id: str, frames: list[int], dead_worker: str = "", unsent: bool = True) -> list[int]:
        """Mark frames whose messages were lost, or (``dead_worker``) that were running on a worker
        that died, as queued again; returns those it changed. ``unsent``: the job's next ``feed``
        sends them; False: the caller sends them itself."""
        out = self._reclaim(keys=self._keys(job_id),
                            args=[time.time(), dead_worker, "1" if unsent else "0", *map(str, frames)])
        return sorted(int(f) for f in out)

    def requeue(self, job_id: str, states: tuple[str, ...], to: str = QUEUED, unsent: bool = True) -> list[int]:
        """Put frames in ``states`` back to ``to`` (queued, or waiting for a job that depends on others):
        ``unsent``, the job's next ``feed`` sends them; else the caller enqueues them."""
        out = self._requeue(keys=self._keys(job_id),
                            args=[self.ttl, time.time(), to, "1" if unsent else "0", *states])
        if out == -1:
            raise JobNotFound(job_id)
        self.r.delete(job_workers_key(job_id))  # a retry gives bad workers a new chance too
        if out:
            self.r.sadd(ACTIVE_JOBS, job_id)
        order = {f: i for i, f in enumerate(self.spec(job_id).frames)}
        return sorted((int(f) for f in out), key=lambda f: order.get(f, f))

    # --- scheduling: the job's share of the farm, pause, dependencies ---------------------------
    def feed(self, spec: JobSpec, all_at_once: bool = False) -> tuple[int, list[int]]:
        """Take the job's unsent frames that fit its share of the farm (``JobSpec.max_workers`` chunks
        in flight, else twice the living workers' task slots), marking them sent: returns the job's
        generation (which the messages carry) and those frames, for the caller to send.
        ``all_at_once``: every unsent frame (a sequence's streams, a training run)."""
        out = self._feed(keys=[*self._keys(spec.id), WORKER_SLOTS],
                         args=[time.time(), max(1, spec.chunk), max(0, spec.max_workers), "1" if all_at_once else "0",
                               self.ttl])
        return int(out[0]), [int(f) for f in out[1:]]

    def pause(self, job_id: str) -> int:
        """Hold the job's queued frames (running ones finish their current frame, then hold the
        rest); returns how many were held."""
        n = self._pause(keys=self._keys(job_id))
        if n < 0:
            raise JobNotFound(job_id)
        return n

    def resume(self, job_id: str) -> int:
        """Queue the held frames again (unsent: the caller feeds the job); returns how many."""
        n = self._resume(keys=self._keys(job_id), args=[time.time()])
        if n < 0:
            raise JobNotFound(job_id)
        if n:
            self.r.sadd(ACTIVE_JOBS, job_id)
        return n

    def is_paused(self, job_id: str) -> bool:
        return self.r.hget(job_key(job_id), "paused") == "1"

    def hold(self, job_id: str, frames: list[int], worker: str) -> list[int]:
        """A paused job's chunk hands back the frames it claimed and did not start: they are held."""
        out = self._hold(keys=self._keys(job_id), args=[worker, *map(str, frames)])
        return sorted(int(f) for f in out)

    def in_flight(self, job_id: str) -> int:
        """Frames of the job sent (by a feed) and not finished, and frames not sent yet: a job with
        any is not done. O(1), unlike ``state``."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(job_key(job_id), "inflight")
        pipe.zcard(unsent_key(job_id))
        inflight, unsent = pipe.execute()
        return max(0, int(inflight or 0)) + int(unsent or 0)

    def recount(self, job_id: str) -> int:
        """Recount the job's frames in flight and waiting, and its unsent set, from the records (the
        reconciler, now and then; every transition keeps them true, this mends what a lost write
        left wrong). Returns the frames in flight."""
        return int(self._recount(keys=self._keys(job_id), args=[self.ttl]))

    def release(self, job_id: str, frames: list[int]) -> list[int]:
        """Frames whose dependencies are done: waiting -> queued (unsent); returns those changed."""
        if not frames:
            return []
        out = self._release(keys=self._keys(job_id), args=[time.time(), *map(str, frames)])
        return sorted(int(f) for f in out)
