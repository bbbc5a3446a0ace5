"""Showing a job's progress in a terminal: a live bar with ETA, and a readable summary."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mlfarm.broker.jobs import FAILED, RUNNING, JobStatus, describe_wait
from mlfarm.frames import format_frames


def follow(poll: Callable[[], JobStatus], console: Console, interval: float = 0.5,
           timeout: float | None = None) -> JobStatus:
    """Redraw a progress bar from the job record until the job ends (or ``timeout`` passes)."""
    status = poll()
    deadline = time.monotonic() + timeout if timeout else None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[red]{task.fields[failed]} failed"), TextColumn("{task.fields[state]}"),
               TextColumn("{task.fields[note]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{status.spec.model} {status.spec.id}", total=status.total, failed=0, state="", note="")
        while True:
            c = status.counts
            bar.update(task, completed=status.completed + c[FAILED], failed=c[FAILED], state=status.state,
                       note=progress_note(status))
            if status.finished or (deadline and time.monotonic() > deadline):
                return status
            time.sleep(interval)
            status = poll()


def progress_note(status: JobStatus) -> str:
    """A training job's step and loss; empty for a render job."""
    p = status.progress
    if not p.get("total_steps"):
        return ""
    note = f"step {p.get('step', 0)}/{p['total_steps']}"
    for key, label in (("loss", "loss"), ("val_loss", "val loss"), ("val_accuracy", "val accuracy")):
        if p.get(key) is not None:
            note += f", {label} {p[key]:.4g}"
    return note


def status_table(status: JobStatus) -> Table:
    spec = status.spec
    table = Table(title=status.summary(), show_header=False, title_justify="left")
    table.add_row("model", f"{spec.model} {spec.model_version}".strip())
    table.add_row("options", ", ".join(f"{k}={v}" for k, v in sorted(spec.options.items())) or "-")
    table.add_row("input", spec.input)
    table.add_row("output", spec.output)
    table.add_row("submitted", f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(spec.created))} "
                               f"by {spec.user}@{spec.host}")
    if status.progress:
        table.add_row("progress", progress_note(status) or "-")
    cached = [f.frame for f in status.frames if f.cached]
    if cached:
        table.add_row("cached", f"{format_frames(cached)}: already on the storage, not rendered again "
                                "(submit with --force to render them)")
    if spec.after or spec.after_frames:
        table.add_row("after", ", ".join(spec.after + ([f"{spec.after_frames} (frame by frame)"]
                                                        if spec.after_frames else [])))
    for wait in status.waiting_on:
        table.add_row("[yellow]waiting on", describe_wait(wait))
    if spec.max_workers:
        table.add_row("max workers", f"{spec.max_workers} chunk{'s' if spec.max_workers > 1 else ''} in flight")
    if status.paused:
        table.add_row("[yellow]paused", f"mlfarm resume {spec.id} queues its held frames again")
    if spec.require:
        table.add_row("requires", ", ".join(spec.require))
    eta = status.eta_seconds()
    if eta is not None:
        table.add_row("eta", f"{eta:.0f}s")
    if status.no_worker:
        table.add_row("[yellow]no worker", status.no_worker)
    for w in status.workers:
        label = "[red]bad worker" if w.get("bad") else "[yellow]worker failures"
        table.add_row(label, f"{w['name']}: {w['failures']} failure{'s' if w['failures'] != 1 else ''} not caused "
                             f"by the input; last: {w['reason']}")
    for worker in status.silent:
        held = format_frames([f.frame for f in status.frames if f.state == RUNNING and f.worker == worker])
        table.add_row("[yellow]not responding", f"{worker}: frames {held} are queued again once its heartbeat "
                                                "has been gone for MLFARM_WORKER_DEAD_AFTER")
    for fs in status.failed_frames:
        table.add_row(f"[red]failed {fs.frame}", f"{fs.reason} (attempts: {fs.attempts})")
    return table
