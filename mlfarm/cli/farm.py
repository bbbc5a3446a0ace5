"""The ``mlfarm`` group and its farm commands: up, worker, workers, models, submit, status, cancel, pause,
resume, retry, demo."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import click
from rich.table import Table

from .common import FarmError, connect, console, job_status, load_settings, wait_and_exit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", default="WARNING", envvar="MLFARM_LOG_LEVEL", show_default=True,
              help="Logging level for mlfarm's own messages.")
def main(log_level: str) -> None:
    """mlfarm: machine-learning inference on VFX shots, on a Celery/Redis render farm."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- running the farm ---------------------------------------------------------------------
@main.command()
@click.option("--workers", default=1, show_default=True, help="Local worker processes to start.")
@click.option("--queues", default="interactive,gpu,cpu,train", show_default=True)
@click.option("--concurrency", default=1, show_default=True, help="Processes per worker (1: solo pool).")
def up(workers: int, queues: str, concurrency: int) -> None:
    """Run a farm on this machine: embedded Redis (unless MLFARM_BROKER_URL is set) and workers.

    Keeps running; Ctrl-C stops everything cleanly.
    """
    from mlfarm.broker.embedded import EmbeddedRedisError, running_embedded_url
    from mlfarm.local_farm import LocalFarm

    settings = load_settings()
    if not settings.broker_url and running_embedded_url(settings.embedded_state_file):
        raise FarmError(f"an embedded farm is already running (state in {settings.embedded_state_file})")
    farm = LocalFarm(settings, workers=workers, queues=queues, concurrency=concurrency)
    try:
        farm.start()
    except EmbeddedRedisError as exc:
        raise FarmError(str(exc)) from None
    where = "embedded Redis on " + farm.url.split("@")[-1] if farm.redis else "broker from MLFARM_BROKER_URL"
    console.print(f"mlfarm up: {where}, {workers} worker(s), storage {settings.storage_root}. Ctrl-C stops.")
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and farm.tend():
            time.sleep(0.2)
    finally:
        console.print("mlfarm up: stopping workers (running chunks finish or go back on the queue)...")
        farm.stop()
    if not stopping:
        raise FarmError("a farm process exited unexpectedly; see the log above")


@main.command()
@click.option("--queues", default="interactive,gpu,cpu", show_default=True,
              help="Queues to consume; interactive is always polled first.")
@click.option("--gpu", type=int, default=None, help="Pin this worker to one GPU (CUDA_VISIBLE_DEVICES).")
@click.option("--gpus", default=None, help="One supervised worker process per GPU (MLFARM_WORKERS_PER_GPU: more): "
              "'all' (every visible GPU) or ids like 0,1. Each is pinned with CUDA_VISIBLE_DEVICES and restarted if "
              "it dies.")
@click.option("--cpus", default=None, help="Run this worker on these cores only, e.g. 0-15 (default "
              "MLFARM_CPUS; with --gpus, each GPU's worker gets its own share of them unless MLFARM_SPLIT_CPUS=false).")
@click.option("--concurrency", default=1, show_default=True, help="1: one process (GPU layout); N: prefork.")
@click.option("--name", default=None, help="Worker name as shown in Flower (with --gpus: may hold {gpu}).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--tags", default=None, help="This worker's tags, e.g. 80gb,h200, matched against jobs' --require "
              "(default MLFARM_WORKER_TAGS, else derived from the GPU: memory class, model and gpu; cpu without one).")
def worker(queues: str, gpu: int | None, gpus: str | None, cpus: str | None, concurrency: int, name: str | None,
           loglevel: str, tags: str | None) -> None:
    """Run one worker process that renders frames from the queues."""
    from mlfarm.broker.connection import InsecureBrokerError, NoBrokerError
    from mlfarm.cpus import parse_cpus
    from mlfarm.worker.main import run_worker

    try:
        cpus = cpus if cpus is not None else load_settings().cpus
        cores = parse_cpus(cpus) if cpus else None
        if gpus is not None:
            from mlfarm.worker.supervisor import run_gpu_workers

            if gpu is not None:
                raise ValueError("use --gpu N (this process on one GPU) or --gpus (one process per GPU), not both")
            if tags is not None:  # each GPU's worker is its own `mlfarm worker`: it reads them from there
                os.environ["MLFARM_WORKER_TAGS"] = tags
            sys.exit(run_gpu_workers(load_settings(), gpus, queues, concurrency, name, loglevel, cores))
        run_worker(load_settings(), [q.strip() for q in queues.split(",") if q.strip()], concurrency, gpu, name,
                   loglevel, cores, tags)
    except (NoBrokerError, InsecureBrokerError, ValueError) as exc:
        raise FarmError(str(exc)) from None


# --- the catalog ---------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--local", is_flag=True, help="Only this machine's model folders, not the farm's catalog.")
def models(as_json: bool, local: bool) -> None:
    """List the models: label, inputs/outputs, options with types, defaults and choices."""
    from mlfarm.models.catalog import Catalog

    if local:
        catalog = Catalog.from_settings(load_settings()).describe_all()
    else:
        try:
            catalog = connect().catalog()
        except FarmError:
            catalog = Catalog.from_settings(load_settings()).describe_all()
    if as_json:
        click.echo(json.dumps(catalog, indent=2, sort_keys=True))
        return
    for name in sorted(catalog):
        d = catalog[name]
        table = Table(title=f"[bold]{name}[/bold] - {d['label']} (v{d['version']}, {d['device']})",
                      title_justify="left", show_lines=False)
        for col in ("option", "type", "default", "allowed"):
            table.add_column(col)
        for o in d["options"] + d["buttons"]:
            allowed = ", ".join(o["choices"]) if "choices" in o else (
                f"{o['min']} .. {o['max']}" if "min" in o else "")
            kind = "button" if o in d["buttons"] else o["type"]
            table.add_row(o["name"], kind, str(o["default"]), allowed)
        console.print(table)
        console.print(f"  inputs: {_planes(d['inputs'])}   outputs: {_planes(d['outputs'])}\n")


def _planes(planes: dict[str, Any]) -> str:
    return ", ".join(f"{k}({v if isinstance(v, int) else '.'.join(v)})" for k, v in planes.items())


# --- jobs ----------------------------------------------------------------------------------
@main.command()
@click.option("--input", "input_", required=True, help="Input pattern, e.g. /plates/sh010/plate.####.exr")
@click.option("--frames", required=True, help="e.g. 1001-1100, 1001-1100x2, 1,5,9-12")
@click.option("--model", required=True)
@click.option("--option", "options", multiple=True, help="NAME=VALUE, repeatable.")
@click.option("--output", required=True, help="Output pattern under the storage root.")
@click.option("--chunk", type=int, default=None, help="Frames per task.")
@click.option("--priority", type=int, default=50, show_default=True, help="0-100, higher first.")
@click.option("--name", default="", help="A name for the job (shown in status and Flower).")
@click.option("--prompt", "prompt_args", multiple=True,
              help="For promptable models (sam2): a prompts JSON file, or FRAME:NAME:box=x0,y0,x1,y1 with "
              "optional :pos=x,y;x,y and :neg=x,y (image pixels, top-left origin); repeatable.")
@click.option("--force", is_flag=True, help="Render every frame, also those whose exact result (same model, "
              "weights, options and input pixels) is already on the storage; by default those are skipped "
              "and counted as cached.")
@click.option("--after", default="", metavar="JOB[,JOB...]", help="Wait until these jobs are done: the job is "
              "recorded (state waiting) but nothing is queued until then. If one fails or is cancelled, it keeps "
              "waiting and status says on which.")
@click.option("--after-frames", default="", metavar="JOB", help="Frame by frame: frame f is queued as soon as "
              "frame f of JOB is done (with its neighbours, for a window model), e.g. a matte pass on a render "
              "still running.")
@click.option("--max-workers", type=int, default=0, show_default=True, help="At most this many chunks of the job "
              "in flight at once (0: no limit beyond its share: jobs of one priority take turns).")
@click.option("--require", "require", multiple=True, help="TAG[,TAG]: only workers with these tags (mlfarm worker "
              "--tags) or facts (gpu_memory_gb>=24) take its chunks, besides what the model requires; repeatable.")
@click.option("--wait", is_flag=True, help="Follow the job; exit 0 only if every frame is done.")
@click.option("--json", "as_json", is_flag=True)
def submit(input_: str, frames: str, model: str, options: tuple[str, ...], output: str, chunk: int | None,
           priority: int, name: str, prompt_args: tuple[str, ...], force: bool, after: str, after_frames: str,
           max_workers: int, require: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """Submit a shot: one task per chunk of frames (a sequence model: one stream per direction)."""
    from mlfarm.client import SubmitError
    from mlfarm.frames import PatternError, parse_frames
    from mlfarm.models.options import OptionError, parse_option_args
    from mlfarm.prompts import PromptError, load

    farm = connect()
    try:
        prompts = load(prompt_args) if prompt_args else None
        spec = farm.submit(model, input_, output, parse_frames(frames), parse_option_args(options), chunk,
                           priority, name, prompts=prompts, force=force,
                           after=[a for a in after.split(",") if a.strip()], after_frames=after_frames.strip(),
                           max_workers=max_workers, require=[t for item in require for t in item.split(",")])
    except (SubmitError, OptionError, PatternError, PromptError) as exc:
        raise FarmError(str(exc)) from None
    if not wait:
        if as_json:
            click.echo(json.dumps({"id": spec.id, "frames": len(spec.frames), "output": spec.output}))
        else:
            waits = ", ".join(spec.after + ([f"frames of {spec.after_frames}"] if spec.after_frames else []))
            how = f"waiting on {waits}" if waits else "queued"
            console.print(f"job {spec.id}: {len(spec.frames)} frames of {model} {how} -> {spec.output}")
            waiting = farm.store.no_worker(spec)
            if waiting:
                console.print(f"[yellow]{waiting}")
        return
    wait_and_exit(farm, spec.id, as_json)


@main.command()
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Live progress until the job ends.")
def status(job_id: str | None, as_json: bool, watch: bool) -> None:
    """A job's counts, progress, ETA and failed frames with reasons; no JOB lists recent jobs."""
    from mlfarm.progress import status_table

    farm = connect()
    if job_id is None:
        jobs = farm.jobs()
        if as_json:
            click.echo(json.dumps([j.to_dict() for j in jobs]))
            return
        for j in jobs:
            console.print(j.summary() + f"  [dim]{j.spec.model} -> {j.spec.output}")
        return
    if watch:
        wait_and_exit(farm, job_id, as_json)
    st = job_status(farm, job_id)
    if as_json:
        click.echo(json.dumps(st.to_dict()))
    else:
        console.print(status_table(st))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def workers(as_json: bool) -> None:
    """The living workers: host, GPU, tags, models loaded, current job, frames done/failed in the last hour."""
    found = connect().workers()
    if as_json:
        click.echo(json.dumps([w.to_dict() for w in found]))
        return
    if not found:
        console.print("no living workers (start one with `mlfarm worker`, or `mlfarm up`)")
        return
    table = Table(title=f"{len(found)} living worker{'s' if len(found) != 1 else ''}", title_justify="left")
    for col in ("worker", "host", "gpu", "tags", "models", "job", "done 1h", "failed 1h", "heartbeat"):
        table.add_column(col, justify="right" if col in ("done 1h", "failed 1h") else "left")
    now = time.time()
    for w in found:
        gpu = f"{w.gpu} ({w.facts.get('gpu_memory_gb', 0):g} GiB)" if w.gpu else "-"
        beat = f"{now - w.heartbeat:.0f}s ago" if w.heartbeat else "-"
        table.add_row(w.name, w.host, gpu, ",".join(w.tags) or "-", ",".join(w.models) or "-",
                      ",".join(w.jobs) or "idle", str(w.done_last_hour), str(w.failed_last_hour), beat)
    console.print(table)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: queued frames are dropped, running ones stop at the next frame."""
    from mlfarm.broker.jobs import JobNotFound

    try:
        n = connect().cancel(job_id)
    except JobNotFound as exc:
        raise FarmError(str(exc)) from None
    console.print(f"job {job_id}: cancelled ({n} queued frames dropped)")


@main.command()
@click.argument("job_id")
def pause(job_id: str) -> None:
    """Pause a job: queued frames are held (not run, not lost); running chunks finish their current frame
    and hold the rest; a sequence stops at a frame boundary."""
    from mlfarm.broker.jobs import JobNotFound

    try:
        n = connect().pause(job_id)
    except JobNotFound as exc:
        raise FarmError(str(exc)) from None
    console.print(f"job {job_id}: paused ({n} queued frames held; running ones finish their current frame). "
                  f"mlfarm resume {job_id} queues them again")


@main.command()
@click.argument("job_id")
def resume(job_id: str) -> None:
    """Resume a paused job: its held frames are queued again (a sequence goes on from its last written frame)."""
    from mlfarm.broker.jobs import JobNotFound

    try:
        n = connect().resume(job_id)
    except JobNotFound as exc:
        raise FarmError(str(exc)) from None
    console.print(f"job {job_id}: resumed ({n} frames queued again)")


@main.command()
@click.argument("job_id")
@click.option("--failed", "failed_only", is_flag=True, help="Only failed frames (default: failed and cancelled).")
@click.option("--wait", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def retry(job_id: str, failed_only: bool, wait: bool, as_json: bool) -> None:
    """Requeue a job's failed frames; frames already done are not rendered again."""
    from mlfarm.broker.jobs import JobNotFound
    from mlfarm.frames import format_frames

    farm = connect()
    try:
        frames = farm.retry(job_id, failed_only)
    except JobNotFound as exc:
        raise FarmError(str(exc)) from None
    if as_json and not wait:
        click.echo(json.dumps({"id": job_id, "requeued": frames}))
    elif not as_json:
        console.print(f"job {job_id}: requeued {len(frames)} frames {format_frames(frames) if frames else ''}")
    if wait:
        wait_and_exit(farm, job_id, as_json)


# --- the demo --------------------------------------------------------------------------------
@main.command()
@click.option("--frames", default=12, show_default=True)
@click.option("--size", default="480x270", show_default=True, help="WIDTHxHEIGHT of the demo plate.")
@click.option("--model", default=None, help="Any installed model whose weights are present (default: blur, "
              "kernel_size=6). A promptable one (sam2) gets a box around the moving disc on the first frame.")
@click.option("--option", "options", multiple=True, help="NAME=VALUE for --model, repeatable.")
def demo(frames: int, size: str, model: str | None, options: tuple[str, ...]) -> None:
    """Make a small EXR plate, run a model over it on the farm (starting one if needed), write a contact sheet."""
    from mlfarm.demo import run_demo
    from mlfarm.models.options import parse_option_args

    width, height = (int(v) for v in size.lower().split("x"))
    ok = run_demo(load_settings(), console, frames, width, height, model, parse_option_args(options))
    sys.exit(0 if ok else 1)
