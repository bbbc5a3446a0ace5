"""What the Read node for a job's results looks like, and the progress text it shows.

Pure Python (3.7+): the thin Nuke layer only copies these values onto knobs, so what an artist
sees - file pattern, range, colour handling, label, failures - is decided and tested here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Tuple

from mlfarm.broker.frames import format_frames, to_printf

#: Output planes with these names hold a colour image; any other plane is data (ids, mattes, depth).
COLOUR_PLANES = ("rgba", "rgb")

#: Failures listed on the node before the rest are summarised as "... and N more".
MAX_LISTED_FAILURES = 20


#: The state shown for a job whose record the farm no longer has (kept MLFARM_JOB_TTL after its last change).
EXPIRED = "expired"


@dataclass(frozen=True)
class Progress:
    """A job's progress as the Nuke main thread receives it: plain values, safe to pass between threads."""

    job_id: str
    model: str
    state: str
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    queued: int = 0
    cancelled: int = 0
    cached: int = 0  # done by finding the exact result already on the storage (the farm's frame cache)
    failures: Tuple[Tuple[int, str], ...] = ()
    error: str = ""
    stalled: int = 0  # running frames whose worker stopped responding (queued again soon)
    held: int = 0  # held by a pause (mlfarm pause, or Pause on the node)
    waiting: int = 0  # waiting on another job (submitted to wait for it)
    waiting_on: str = ""  # what they wait on, as the farm says it

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled", EXPIRED)

    @classmethod
    def from_status(cls, status: Any) -> Progress:
        """From a ``JobStatus`` (duck-typed so this module does not import the job store)."""
        c = status.counts
        return cls(job_id=status.spec.id, model=status.spec.model, state=status.state, total=status.total,
                   done=c.get("done", 0), failed=c.get("failed", 0), running=c.get("running", 0),
                   queued=c.get("queued", 0), cancelled=c.get("cancelled", 0), cached=c.get("cached", 0),
                   failures=tuple((f.frame, f.reason) for f in status.failed_frames),
                   stalled=status.stalled, held=c.get("held", 0), waiting=c.get("waiting", 0),
                   waiting_on="; ".join(_wait_text(w) for w in getattr(status, "waiting_on", ())))


@dataclass(frozen=True)
class ReadSettings:
    """The knobs of the Read node created for a job's output."""

    name: str
    file: str
    first: int
    last: int
    raw: bool
    colorspace: Optional[str]
    label: str
    knobs: Mapping[str, Any] = field(default_factory=dict)


def main_plane_is_colour(description: Mapping[str, Any]) -> bool:
    """Whether the model writes a colour image: an ``rgba``/``rgb`` output plane.

    Checked by name, not position: the published catalog is JSON with sorted keys, so the order the
    model declared its planes in does not survive the trip through Redis.
    """
    return any(name.lower() in COLOUR_PLANES for name in description.get("outputs", {}))


def result_colour(description: Mapping[str, Any], rendered_first: bool,
                  source_raw: bool = True, source_colorspace: Optional[str] = None) -> Tuple[bool, Optional[str]]:
    """``(raw, colorspace)`` for the results Read.

    Data planes (mattes, ids, depth) must never be colour-converted, and frames the farm read after
    Nuke rendered them raw are in the working space already: both read back raw. A model that
    returns a colour image from a plate read directly gives it back in the plate's own colourspace,
    so the results Read copies the source Read's colour settings.
    """
    if rendered_first or not main_plane_is_colour(description):
        return True, None
    if source_raw or not source_colorspace or source_colorspace.startswith("default"):
        return bool(source_raw), None  # "default (...)" follows the file type, the same for both Reads
    return False, source_colorspace


def node_name(model: str, output: str) -> str:
    """``ML_<model>_<version folder>``; Nuke adds a number if the name is taken."""
    version = os.path.basename(os.path.dirname(output))
    base = "ML_%s" % model
    if re.match(r"^v\d+$", version):
        base += "_" + version
    return re.sub(r"[^A-Za-z0-9_]", "_", base)


def expired_progress(job_id: str) -> Progress:
    """What a results Read shows once its job's record has expired on the farm."""
    return Progress(job_id=job_id, model="", state=EXPIRED, total=0)


def progress_label(p: Progress, version: str = "") -> str:
    """The Read node's label: job id, model and progress, kept short enough for the node graph."""
    if p.state == EXPIRED:
        return ("mlfarm %s\njob record expired on the farm\nframes on disk are kept; resubmit to render again"
                % p.job_id)
    model = "%s v%s" % (p.model, version) if version else p.model
    line = "%d/%d done" % (p.done + p.cached, p.total)
    if p.cached:
        line += " (%d cached)" % p.cached
    if p.failed:
        line += ", %d failed" % p.failed
    if p.cancelled:
        line += ", %d cancelled" % p.cancelled
    if p.held:
        line += ", %d held" % p.held
    if p.waiting:
        line += ", %d waiting" % p.waiting
    text = "mlfarm %s\n%s\n%s [%s]" % (p.job_id, model, line, p.state)
    if p.waiting_on:
        text += "\nwaiting on %s" % p.waiting_on
    if p.stalled:
        text += "\n%d on a worker not responding: queued again soon" % p.stalled
    if p.failures:
        text += "\nfailed: %s" % format_frames([f for f, _ in p.failures])
    if p.error:
        text += "\n%s" % p.error
    return text


def _wait_text(wait: Mapping[str, Any]) -> str:
    """One thing a job waits on, short enough for a node label: "job ab12 (failed)"."""
    what = "job %s frames %s" % (wait["job"], wait["frames"]) if wait.get("frames") else "job %s" % wait["job"]
    return "%s (%s)" % (what, wait["state"])


def failure_text(failures: Sequence[Tuple[int, str]]) -> str:
    """One line per failed frame with its reason, for the node's ML Farm tab."""
    if not failures:
        return "no failed frames"
    lines = ["%d: %s" % (frame, reason or "no reason recorded") for frame, reason in failures[:MAX_LISTED_FAILURES]]
    if len(failures) > MAX_LISTED_FAILURES:
        lines.append("... and %d more" % (len(failures) - MAX_LISTED_FAILURES))
    return "\n".join(lines)


def read_settings(job_id: str, model: str, version: str, output: str, frames: Sequence[int],
                  description: Mapping[str, Any], rendered_first: bool, source_raw: bool = True,
                  source_colorspace: Optional[str] = None) -> ReadSettings:
    """Everything the results Read needs, from the submitted job and the model's description."""
    raw, colorspace = result_colour(description, rendered_first, source_raw, source_colorspace)
    total = len(frames)
    waiting = Progress(job_id=job_id, model=model, state="queued", total=total, queued=total)
    return ReadSettings(
        name=node_name(model, output),
        file=to_printf(output),
        first=min(frames),
        last=max(frames),
        raw=raw,
        colorspace=colorspace,
        label=progress_label(waiting, version),
        knobs={"mlfarm_job": job_id, "mlfarm_frames": format_frames(frames)},
    )
