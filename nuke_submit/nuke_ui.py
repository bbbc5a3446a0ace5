"""The thin layer that talks to Nuke: the submit panel, the results Read node, live progress.

Every decision (frames, paths, names, colour, label text) is made by the pure modules beside this
one; this module only reads and writes knobs, creates nodes and runs Nuke's own render for the
render-first path. Nodes are touched on Nuke's main thread only: progress arrives from a polling
thread through ``nuke.executeInMainThread``, and nothing on the main thread waits on the farm for
longer than ``MLFARM_NUKE_TIMEOUT`` (a hung Redis must not freeze Nuke).

Only names of Nuke's documented Python API are used (tests/nuke_stub/nuke_api.py lists them). The
farm client (Celery, redis-py, pydantic-settings) and ``nukescripts`` are imported on first use, so
the menu installs, and says what is missing, even where those are not installed for Nuke's Python,
and ``nuke -t`` (no panels) imports this module too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import nuke

from mlfarm.broker.frames import PatternError, check_pattern, format_frames, parse_frames
from mlfarm.models.options import OptionError, validate_options

from .knobs import KnobSpec, option_knobs, options_from_knobs
from .plan import (
    FRAME_MODES,
    READ_TIMING_KNOBS,
    PlanError,
    ReadTiming,
    check_frames_exist,
    choose_frames,
    farm_pattern,
    frame_runs,
    output_pattern,
    place_beside,
    reads_directly,
    render_pattern,
    reserve_output,
    shot_name,
    write_channels,
)
from .results import Progress, expired_progress, failure_text, progress_label, read_settings
from .watch import JobWatcher, Watchers

log = logging.getLogger(__name__)

#: Knobs mlfarm adds to a results Read (on its "ML Farm" tab); they travel with the saved script.
JOB_KNOB = "mlfarm_job"
FRAMES_KNOB = "mlfarm_frames"
VERSION_KNOB = "mlfarm_version"
FAILURES_KNOB = "mlfarm_failures"

WATCHERS = Watchers()
_shown_done = {}  # type: Dict[str, int]  # job id -> done count the Read was last reloaded for


@dataclass
class Submission:
    job_id: str
    spec: Any  # the client's JobSpec
    read: Any  # the results Read node
    rendered_first: bool
    input: str


# --- the farm ------------------------------------------------------------------------------------
def farm_client():
    """A ``Farm`` whose every call gives up after ``MLFARM_NUKE_TIMEOUT``; contacts nothing yet."""
    try:
        from mlfarm.client import Farm
        from mlfarm.settings import get_settings
    except ImportError as exc:
        raise PlanError("the ML Farm client libraries are not installed for Nuke's Python (%s); "
                        "see 'Nuke setup' in the mlfarm docs" % exc) from None
    try:
        settings = get_settings()
        return Farm(settings, timeout=settings.nuke_timeout)
    except Exception as exc:  # no broker configured, insecure URL, a bad settings file
        raise PlanError("cannot reach the farm: %s" % exc) from None


def connect():
    """A ``Farm`` for the configured broker, checked to answer within the Nuke timeout, or a PlanError
    saying what is wrong."""
    farm = farm_client()
    try:
        farm.redis.ping()
    except Exception as exc:  # Redis down, hung, or refusing our password: all need the same fix
        raise PlanError("cannot reach the farm (no answer within %gs): %s" % (farm.timeout, exc)) from None
    return farm


class JobExpired(PlanError):
    """A results Read's job is no longer on the farm: its record outlived the job TTL."""


def _job_call(read: Any, farm: Any, call: Any) -> Any:
    """``call(job_id)`` for a results Read's job; an expired record becomes a message an artist can act on."""
    job_id = read[JOB_KNOB].value()
    try:
        return call(job_id)
    except KeyError:  # the farm's JobNotFound: the record expired after MLFARM_JOB_TTL
        days = farm.settings.job_ttl / 86400.0
        read["label"].setValue(progress_label(expired_progress(job_id)))
        raise JobExpired(
            "job %s is no longer on the farm: job records are kept %g days after their last change. "
            "The frames it rendered are still on disk (%s); to render again, submit the source node again."
            % (job_id, days, os.path.dirname(read["file"].value()))) from None


def _user_error(exc: Exception) -> bool:
    if isinstance(exc, (PlanError, PatternError, OptionError)):
        return True
    try:
        from mlfarm.client import SubmitError
    except ImportError:
        return False
    return isinstance(exc, SubmitError)


def _report(exc: Exception) -> None:
    if _user_error(exc):
        nuke.message("ML Farm: %s" % exc)
    else:
        log.exception("mlfarm: unexpected error")
        nuke.message("ML Farm: unexpected error: %s: %s (details in the script editor)" % (type(exc).__name__, exc))


# --- reading the node ------------------------------------------------------------------------------
def _source_pattern(node: Any) -> Optional[str]:
    """The farm pattern of a Read node's frames (``None`` for any other node: it is rendered first)."""
    if node.Class() != "Read":
        return None
    return farm_pattern(nuke.filename(node) or node["file"].value())


def read_timing(node: Any) -> Optional[ReadTiming]:
    """How a Read maps timeline frames to its files' frames (``None`` for any other node)."""
    if node.Class() != "Read":
        return None
    return ReadTiming.from_knobs({k: node[k].value() for k in READ_TIMING_KNOBS if node.knob(k) is not None})


def _frames_arg(node: Any, frames: Union[None, str, Sequence[int]]) -> List[int]:
    if frames is None:
        return choose_frames("input", (node.firstFrame(), node.lastFrame()), _script_range())
    if isinstance(frames, str):
        try:
            return parse_frames(frames)
        except PatternError as exc:
            raise PlanError(str(exc)) from None
    out = [int(f) for f in frames]
    if not out:
        raise PlanError("no frames to render")
    return out


def _script_range() -> tuple:
    root = nuke.root()
    return int(root["first_frame"].value()), int(root["last_frame"].value())


# --- submitting ------------------------------------------------------------------------------------
def submit(node: Any, model: str, options: Optional[Dict[str, Any]] = None,
           frames: Union[None, str, Sequence[int]] = None, chunk: Optional[int] = None, priority: int = 50,
           output: Optional[str] = None, shot: Optional[str] = None, farm: Any = None,
           watch: bool = True, prompts_json: Optional[str] = None, force: bool = False,
           wait_for: str = "") -> Submission:
    """Submit ``node``'s frames to the farm and create a Read node for the results.

    ``frames``: None (the node's range), a string such as ``1001-1100x2``, or a list. A Read of EXRs
    on shared storage is read by the farm directly; any other node is first rendered to EXR under the
    storage root. Everything that can be checked is checked before rendering or queueing anything.
    ``force``: render every frame, also those whose exact result the farm already has.
    ``wait_for``: for the results Read of an earlier job, ``"job"`` waits until that job is done,
    ``"frames"`` queues each frame as soon as the same frame of it is done (its files need not
    exist yet); ``""`` submits at once.
    """
    farm = farm or connect()
    settings = farm.settings
    description = farm.describe(model, include_local=False)
    frame_list = _frames_arg(node, frames)  # timeline frames: what the node shows at each
    typed = validate_options(description, dict(options or {}))
    source = _source_pattern(node)
    timing = read_timing(node)
    shot = shot or shot_name(nuke.root().name(), source or "")
    out = output or output_pattern(settings.nuke_output_template, str(settings.storage_root), shot, model)
    try:
        check_pattern(out)
    except PatternError as exc:
        raise PlanError(str(exc)) from None
    farm.check_output(out)
    parent = upstream_job(node) if wait_for else ""
    if wait_for and not parent:
        raise PlanError("%s is not the results Read of a farm job: there is no job to wait for" % node.name())
    if wait_for not in ("", "job", "frames"):
        raise PlanError("wait_for is job, frames or empty, not %r" % wait_for)
    file_frames = None  # type: Optional[List[int]]
    if source is not None and timing is not None and timing.shift() is not None:
        file_frames = timing.file_frames(frame_list)
        if not file_frames:
            raise PlanError("%s shows none of its files at frames %s (black outside %d-%d)"
                            % (node.name(), format_frames(frame_list), timing.first, timing.last))
        if not parent:  # a job it waits on writes them later
            check_frames_exist(source, file_frames)
    if file_frames is not None and reads_directly(node.Class(), source, settings.nuke_read_roots):
        # The farm reads the files themselves: submit their frame numbers, and give the results Read
        # the source's timing so each result lines up with its plate frame in the comp.
        input_pattern, rendered, job_frames = source, False, file_frames
        result_timing = timing.for_results(file_frames)  # type: Optional[ReadTiming]
    else:  # Nuke renders what the timeline shows, numbered by timeline frame: no retime left to apply
        input_pattern = render_first(node, frame_list, shot, description, settings)
        rendered, job_frames, result_timing = True, frame_list, None
    prompts = _prompts(prompts_json, description, timing if result_timing is not None else None)
    try:
        spec = farm.submit(model, input_pattern, out, job_frames, typed, chunk, priority,
                           name="%s %s" % (shot, node.name()), include_local=False, prompts=prompts,
                           image_size=(node.width(), node.height()) if prompts is not None else None,
                           force=force, after=[parent] if wait_for == "job" else [],
                           after_frames=parent if wait_for == "frames" else "")
    except Exception:
        if rendered:  # refused (e.g. the chunk size): the render made for it goes too
            shutil.rmtree(os.path.dirname(input_pattern), ignore_errors=True)
        raise
    reserve_output(out, spec.id)
    read = create_results_read(node, spec, description, rendered, result_timing)
    if watch:
        follow(read, farm)
    return Submission(job_id=spec.id, spec=spec, read=read, rendered_first=rendered, input=input_pattern)


def _prompts(prompts_json: Optional[str], description: Dict[str, Any], timing: Optional[ReadTiming]) -> Any:
    """The job's prompts from a prompt node's keyframes (timeline frames), as the farm numbers the
    frames: a Read's files' numbers where the farm reads the files (``timing``). None for a model
    that takes no prompts."""
    if not prompts_json or not description.get("promptable"):
        return None
    from mlfarm.prompts import PromptError, from_json

    entries = json.loads(prompts_json)
    if timing is not None:
        for entry in entries:
            shown = timing.file_frame(entry["frame"])
            if shown is None:
                raise PlanError("keyframe %d: the Read shows no file there" % entry["frame"])
            entry["frame"] = shown
    try:
        return from_json(entries)
    except PromptError as exc:
        raise PlanError("prompts: %s" % exc) from None


def render_first(node: Any, frames: Sequence[int], shot: str, description: Dict[str, Any], settings: Any) -> str:
    """Render ``node`` to scene-linear EXRs under the storage root with a temporary Write; returns the pattern."""
    pattern = render_pattern(settings.nuke_render_template, str(settings.storage_root), shot, node.name())
    folder = os.path.dirname(pattern)
    os.makedirs(folder)  # new for every submission, so removing it on failure removes only our frames
    write = nuke.nodes.Write()
    try:
        write.setInput(0, node)
        for knob, value in (("file", pattern), ("file_type", "exr"), ("channels", write_channels(description)),
                            ("raw", True), ("datatype", "32 bit float"), ("compression", "Zip (1 scanline)")):
            write[knob].setValue(value)
        started = time.time()
        for first, last, step in frame_runs(frames):
            nuke.execute(write, first, last, step)
        log.info("mlfarm: rendered %d frames of %s in %.1fs", len(frames), node.name(), time.time() - started)
        check_frames_exist(pattern, frames)
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise PlanError("rendering %s to EXR for the farm failed, nothing was submitted: %s"
                        % (node.name(), exc)) from None
    finally:
        nuke.delete(write)
    return pattern


#: Node sizes in the graph when Nuke has not drawn a node yet (it answers 0 then).
DEFAULT_NODE_SIZE = (80, 18)
READ_NODE_SIZE = (80, 78)  # a Read shows a thumbnail


def _rect(node: Any) -> tuple:
    fallback = READ_NODE_SIZE if node.Class() == "Read" else DEFAULT_NODE_SIZE
    return (node.xpos(), node.ypos(), node.screenWidth() or fallback[0], node.screenHeight() or fallback[1])


def place_results_read(read: Any, source: Any) -> None:
    """Put a new results Read right of its source, level with it, where it overlaps no node."""
    others = [_rect(n) for n in nuke.allNodes() if n is not read]
    x, y = place_beside(_rect(source), _rect(read)[2:], others)
    read.setXYpos(int(x), int(y))


def create_results_read(source: Any, spec: Any, description: Dict[str, Any], rendered_first: bool,
                        timing: Optional[ReadTiming] = None) -> Any:
    """A Read beside ``source`` for the job's output, with its range, timing, colour handling and label.

    ``timing``: the source Read's timing for these frames, so the results line up with the plate in
    the comp; ``None`` when the results are numbered by timeline frame (a render-first submission).
    """
    is_read = source.Class() == "Read"
    source_raw = bool(source["raw"].value()) if is_read and source.knob("raw") is not None else True
    source_cs = source["colorspace"].value() if is_read and source.knob("colorspace") is not None else None
    rs = read_settings(spec.id, spec.model, spec.model_version, spec.output, spec.frames, description,
                       rendered_first, source_raw, source_cs)
    read = nuke.nodes.Read()
    read["file"].setValue(rs.file)
    for knob in ("first", "origfirst"):
        read[knob].setValue(rs.first)
    for knob in ("last", "origlast"):
        read[knob].setValue(rs.last)
    if timing is not None:
        for knob in ("frame_mode", "frame", "before", "after"):
            read[knob].setValue(getattr(timing, knob))
    read["raw"].setValue(rs.raw)
    if rs.colorspace:
        read["colorspace"].setValue(rs.colorspace)
    read["on_error"].setValue("checkerboard")  # frames still rendering are obvious, not errors
    read["label"].setValue(rs.label)
    read.setName(rs.name)
    place_results_read(read, source)
    read.addKnob(nuke.Tab_Knob("mlfarm", "ML Farm"))
    for name, label, value in ((JOB_KNOB, "job", rs.knobs[JOB_KNOB]),
                               (FRAMES_KNOB, "frames", rs.knobs[FRAMES_KNOB]),
                               (VERSION_KNOB, "model version", spec.model_version)):
        k = nuke.String_Knob(name, label)
        read.addKnob(k)
        k.setValue(value)
    read.addKnob(nuke.Text_Knob(FAILURES_KNOB, "failed frames", failure_text(())))
    call = "import mlfarm.nuke_submit.nuke_ui as ui; ui.%s(nuke.thisNode())"
    read.addKnob(nuke.PyScript_Knob("mlfarm_retry", "Retry failed", call % "retry_failed_command"))
    read.addKnob(nuke.PyScript_Knob("mlfarm_refresh", "Refresh", call % "refresh_node_command"))
    read.addKnob(nuke.PyScript_Knob("mlfarm_cancel", "Cancel job", call % "cancel_job_command"))
    read.addKnob(nuke.PyScript_Knob("mlfarm_pause", "Pause", call % "pause_job_command"))
    read.addKnob(nuke.PyScript_Knob("mlfarm_resume", "Resume", call % "resume_job_command"))
    return read


def upstream_job(node: Any) -> str:
    """The job whose results ``node`` reads (a results Read), or ""."""
    knob = node.knob(JOB_KNOB) if node.Class() == "Read" else None
    return knob.value() if knob is not None else ""


# --- progress --------------------------------------------------------------------------------------
def apply_progress(read: Any, progress: Progress) -> None:
    """Show a progress snapshot on the results Read (main thread only) and reload it when frames land."""
    version = read[VERSION_KNOB].value() if read.knob(VERSION_KNOB) is not None else ""
    read["label"].setValue(progress_label(progress, version))
    read[FAILURES_KNOB].setValue(failure_text(progress.failures))
    landed = progress.done + progress.cached
    if landed > _shown_done.get(progress.job_id, 0):
        _shown_done[progress.job_id] = landed
        read["reload"].execute()


def _apply_or_stop(read: Any, progress: Progress) -> None:
    try:
        apply_progress(read, progress)
    except ValueError:  # Nuke's answer for a node that was deleted: nothing left to show progress on
        WATCHERS.stop(progress.job_id)


def follow(read: Any, farm: Any) -> JobWatcher:
    """Poll the job on a background thread; every change is applied on the main thread.

    Returns at once: the first poll, like every later one, happens on the watcher's thread.
    """
    job_id = read[JOB_KNOB].value()

    def deliver(progress: Progress) -> None:
        nuke.executeInMainThread(_apply_or_stop, args=(read, progress))

    watcher = JobWatcher(job_id, lambda: farm.status(job_id), deliver, interval=farm.settings.nuke_poll_interval)
    return WATCHERS.start(watcher)


def refresh_node(read: Any, farm: Any = None) -> Progress:
    """Bring one results Read up to date now, and keep following it if its job is still running."""
    farm = farm or connect()
    progress = Progress.from_status(_job_call(read, farm, farm.status))
    apply_progress(read, progress)
    if not progress.finished and not WATCHERS.running(progress.job_id):
        follow(read, farm)
    return progress


def result_reads() -> List[Any]:
    """Every results Read in the script, inside groups too."""
    return [n for n in nuke.allNodes("Read", recurseGroups=True)
            if n.knob(JOB_KNOB) is not None and n[JOB_KNOB].value()]


def refresh_results(farm: Any = None) -> List[JobWatcher]:
    """Follow every results Read in the script again (after reopening it, or after a network hiccup).

    Never waits on the farm: each Read gets a watcher whose polls run off the main thread, so a farm
    that is down or hung shows on the labels ("farm unreachable", then the progress once it answers)
    instead of freezing Nuke.
    """
    farm = farm or farm_client()
    return [follow(read, farm) for read in result_reads()]


def retry_failed(read: Any, farm: Any = None) -> List[int]:
    """Requeue only the failed frames of a results Read's job and follow it again."""
    farm = farm or connect()
    frames = _job_call(read, farm, lambda job_id: farm.retry(job_id, failed_only=True))
    if frames:
        apply_progress(read, Progress.from_status(_job_call(read, farm, farm.status)))
        follow(read, farm)  # always a fresh watcher: the last one stopped when it saw the job end
    return frames


def cancel_job(read: Any, farm: Any = None) -> int:
    """Cancel a results Read's job: queued frames are dropped, running ones stop at the next frame."""
    farm = farm or connect()
    dropped = _job_call(read, farm, farm.cancel)
    refresh_node(read, farm)
    return dropped


def pause_job(read: Any, farm: Any = None) -> int:
    """Pause a results Read's job: queued frames are held, running ones finish the frame they are on."""
    farm = farm or connect()
    held = _job_call(read, farm, farm.pause)
    refresh_node(read, farm)
    return held


def resume_job(read: Any, farm: Any = None) -> int:
    """Resume a results Read's paused job: its held frames are queued again."""
    farm = farm or connect()
    queued = _job_call(read, farm, farm.resume)
    refresh_node(read, farm)
    return queued


# --- the panel ----------------------------------------------------------------------------------------
def make_knob(spec: KnobSpec) -> Any:
    """The Nuke knob for one model option."""
    if spec.kind == "int":
        knob = nuke.Int_Knob(spec.name, spec.label)
    elif spec.kind == "float":
        knob = nuke.Double_Knob(spec.name, spec.label)
    elif spec.kind == "bool":
        knob = nuke.Boolean_Knob(spec.name, spec.label)
    elif spec.kind == "enum":
        knob = nuke.Enumeration_Knob(spec.name, spec.label, list(spec.values))
    else:
        knob = nuke.String_Knob(spec.name, spec.label)
    if spec.range is not None and spec.kind in ("int", "float"):
        knob.setRange(spec.range[0], spec.range[1])
    knob.setValue(spec.default)
    return knob


class _SubmitPanel(object):
    """*ML Farm > Submit selected...*: model, its options, frames, chunk, priority, output.

    Mixed into ``nukescripts.PythonPanel`` by :func:`SubmitPanel` on first use. The panel makes its own
    OK and Cancel buttons (``okButton``/``cancelButton``, which ``nukescripts.PythonPanel`` then uses
    instead of adding its own) so that it can keep them last when a model switch changes the option knobs.
    """

    def __init__(self, node: Any, farm: Any, prompts_json: Optional[str] = None):
        super(_SubmitPanel, self).__init__("ML Farm: submit %s" % node.name(), "uk.co.mlfarm.submit")
        self.node = node
        self.prompts_json = prompts_json  # from a prompt node: its keyframes
        self.farm = farm
        self.catalog = farm.catalog(include_local=False)
        if not self.catalog:
            raise PlanError("the farm has published no models yet: is a worker running? (mlfarm up / mlfarm worker)")
        source = _source_pattern(node)
        self.input_range = (node.firstFrame(), node.lastFrame())
        self.model = nuke.Enumeration_Knob("model", "model", sorted(self.catalog))
        self.frame_mode = nuke.Enumeration_Knob("frame_range", "frame range", list(FRAME_MODES))
        self.custom = nuke.String_Knob("custom_frames", "custom frames")
        self.chunk = nuke.Int_Knob("chunk", "chunk size")
        self.priority = nuke.Int_Knob("priority", "priority")
        self.shot = nuke.String_Knob("shot", "shot")
        self.output = nuke.File_Knob("output", "output")
        self.skip_rendered = nuke.Boolean_Knob("skip_rendered", "skip frames already rendered")
        for knob in (self.model, self.frame_mode, self.custom, self.chunk, self.priority, self.shot, self.output,
                     self.skip_rendered):
            self.addKnob(knob)
        # The results Read of an earlier job as the input: offer to wait for that job.
        self.parent_job = upstream_job(node)
        self.wait_for = None  # type: Any
        if self.parent_job:
            choices = list(WAIT_CHOICES)
            self.wait_for = nuke.Enumeration_Knob("wait_for", "wait for job %s" % self.parent_job, choices)
            self.addKnob(self.wait_for)
            self.wait_for.setValue(default_wait(farm, self.parent_job))
            self.wait_for.setTooltip("whole job: nothing is queued until job %s is done. frame by frame: each "
                                     "frame is queued as soon as the same frame of it is done. no: submit now "
                                     "(its frames must exist already)." % self.parent_job)
        self.skip_rendered.setValue(True)  # the farm's frame cache: same model, options and pixels
        self.skip_rendered.setTooltip("Frames whose exact result (same model, weights, options and input "
                                      "pixels) is already on the storage are taken from there, not rendered. "
                                      "Off: render every frame again.")
        self.addKnob(nuke.Text_Knob("options_divider", "model options"))
        self.custom.setValue("%d-%d" % self.input_range)
        self.custom.setEnabled(False)  # until the frame range is "custom"
        self.priority.setValue(50)
        self.shot.setValue(shot_name(nuke.root().name(), source or ""))
        self.option_knobs = []  # type: List[Any]
        self.specs = []  # type: List[KnobSpec]
        if prompts_json:  # from a prompt node: a promptable model, SAM 2 where the farm has it
            from .prompt_values import keyframes_text

            promptable = [m for m in sorted(self.catalog) if self.catalog[m].get("promptable")]
            if not promptable:
                raise PlanError("the farm has no model that takes prompts (sam2): is its worker running?")
            self.model.setValue("sam2" if "sam2" in promptable else promptable[0])
            self.addKnob(nuke.Text_Knob("prompts", "prompts", keyframes_text(prompts_json)))
        self.okButton = nuke.Script_Knob("OK", "Submit")  # noqa: N815 - the names nukescripts looks for
        self.cancelButton = nuke.Script_Knob("Cancel")  # noqa: N815
        self.rebuild_options()

    def rebuild_options(self) -> None:
        """Replace the option knobs with the chosen model's, and point the output at its next version.

        OK and Cancel are taken off and put back after the new knobs, so they stay at the bottom.
        """
        for knob in self.option_knobs + [self.okButton, self.cancelButton]:
            if knob.name() in self.knobs():
                self.removeKnob(knob)
        self.specs = option_knobs(self.catalog[self.model.value()])
        self.option_knobs = [make_knob(s) for s in self.specs]
        for knob in self.option_knobs + [self.okButton, self.cancelButton]:
            self.addKnob(knob)
        sequence = self.catalog[self.model.value()].get("temporal") == "sequence"
        settings = self.farm.settings
        self.chunk.setValue(settings.sequence_segment if sequence else settings.default_chunk)
        self.update_output()

    def update_output(self) -> None:
        settings = self.farm.settings
        self.output.setValue(output_pattern(settings.nuke_output_template, str(settings.storage_root),
                                            self.shot.value(), self.model.value()))

    def knobChanged(self, knob: Any) -> None:  # noqa: N802 - Nuke's callback name
        name = knob.name()
        if name == "model":
            self.rebuild_options()
        elif name == "shot":
            self.update_output()
        elif name == "frame_range":
            self.custom.setEnabled(self.frame_mode.value() == "custom")

    def frames(self) -> List[int]:
        return choose_frames(self.frame_mode.value(), self.input_range, _script_range(), self.custom.value())

    def options(self) -> Dict[str, Any]:
        return options_from_knobs(self.specs, {k.name(): k.value() for k in self.option_knobs})

    def submit(self, watch: bool = True) -> Submission:
        return submit(self.node, self.model.value(), self.options(), self.frames(), int(self.chunk.value()),
                      int(self.priority.value()), self.output.value(), self.shot.value(), self.farm, watch,
                      self.prompts_json, force=not self.skip_rendered.value(),
                      wait_for=WAIT_CHOICES[self.wait_for.value()] if self.wait_for is not None else "")


#: The submit panel's choices for a results Read input: label -> ``submit(wait_for=...)``.
WAIT_CHOICES = {"whole job": "job", "frame by frame": "frames", "no": ""}


def default_wait(farm: Any, job_id: str) -> str:
    """Wait for a job still rendering (whole job: safe for every model); not for one that is done."""
    try:
        state = farm.status(job_id).state
    except Exception:  # expired, or the farm did not answer: nothing to wait for that we know of
        return "no"
    return "no" if state == "done" else "whole job"


_panel_class = None


def SubmitPanel(node: Any, farm: Any, prompts_json: Optional[str] = None) -> Any:  # noqa: N802 - reads as a class
    """The submit panel for ``node``: a ``nukescripts.PythonPanel``, made on first use so that importing
    this module needs no ``nukescripts`` (``nuke -t`` has no panels)."""
    global _panel_class
    if _panel_class is None:
        import nukescripts

        _panel_class = type("SubmitPanel", (_SubmitPanel, nukescripts.PythonPanel), {})
    return _panel_class(node, farm, prompts_json)


# --- menu commands: each reports refusals with nuke.message instead of raising --------------------------
def submit_selected() -> Optional[Submission]:
    try:
        node = nuke.selectedNode()
    except ValueError:
        nuke.message("ML Farm: select the node to submit first")
        return None
    try:
        panel = SubmitPanel(node, connect())
        if not panel.showModalDialog():
            return None
        return panel.submit()
    except Exception as exc:
        _report(exc)
        return None


def refresh_on_script_load() -> None:
    """Registered with ``nuke.addOnScriptLoad``: follow an opened script's jobs again, without pop-ups.

    Waits on nothing: the labels fill in from the watchers' threads.
    """
    if not result_reads():
        return
    try:
        refresh_results()
    except Exception as exc:  # a farm that is misconfigured must not nag at every script open
        log.warning("mlfarm: results not refreshed after opening the script: %s", exc)


def refresh_results_command() -> None:
    try:
        refresh_results()
    except Exception as exc:
        _report(exc)


def refresh_node_command(read: Any) -> None:
    try:
        refresh_node(read)
    except Exception as exc:
        _report(exc)


def cancel_job_command(read: Any) -> None:
    try:
        cancel_job(read)
    except Exception as exc:
        _report(exc)


def pause_job_command(read: Any) -> None:
    try:
        pause_job(read)
    except Exception as exc:
        _report(exc)


def resume_job_command(read: Any) -> None:
    try:
        resume_job(read)
    except Exception as exc:
        _report(exc)


def retry_failed_command(read: Any) -> None:
    try:
        frames = retry_failed(read)
        if not frames:
            nuke.message("ML Farm: job %s has no failed frames" % read[JOB_KNOB].value())
    except Exception as exc:
        _report(exc)


def retry_selected_command() -> None:
    reads = [n for n in nuke.selectedNodes() if n.knob(JOB_KNOB) is not None]
    if not reads:
        nuke.message("ML Farm: select a results Read node (made by Submit selected...)")
    for read in reads:
        retry_failed_command(read)


def settings_text(settings: Any, url: str) -> str:
    from .plan import masked_url

    lines = [
        "broker: %s" % masked_url(url),
        "storage root: %s" % settings.storage_root,
        "shared roots read directly: %s" % (settings.nuke_shared_roots or "-"),
        "output template: %s" % settings.nuke_output_template,
        "progress poll: every %gs" % settings.nuke_poll_interval,
        "",
        "Change these with MLFARM_* environment variables or the settings file",
        "(MLFARM_CONFIG, default ~/.config/mlfarm/mlfarm.toml), then restart Nuke.",
    ]
    return "\n".join(lines)


def show_settings() -> None:
    """*ML Farm > Settings...*: where this Nuke submits to, and whether the farm answers."""
    try:
        farm = connect()
        models = sorted(farm.catalog(include_local=False))
        text = settings_text(farm.settings, farm.url)
        text += "\n\nfarm reachable; models: %s" % (", ".join(models) or "none published yet")
    except Exception as exc:
        text = "ML Farm: %s" % exc
    nuke.message(text)
