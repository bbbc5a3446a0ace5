"""What every ``mlfarm`` sub-command shares: the consoles, the one error type, settings, the farm.

Its own module so sub-command modules (``fetch``, ``train``, ``gateway``, ``flower``) import it
without importing the command group that imports them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from mlfarm.settings import Settings, get_settings

if TYPE_CHECKING:  # the client (Redis, Celery) is imported only by the commands that use it
    from mlfarm.client import Farm, JobStatus

console = Console(soft_wrap=True)  # reasons and paths stay on one line when piped
err_console = Console(stderr=True, soft_wrap=True)


class FarmError(click.ClickException):
    """Any refusal or failure the user can act on: printed as one line, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        # Escaped: a reason such as "box must be [x0, y0, x1, y1]" is text, not rich markup.
        err_console.print(f"[red]error:[/red] {escape(self.format_message())}", highlight=False)


def load_settings() -> Settings:
    """The settings, or a one-line FarmError naming the bad variable."""
    try:
        return get_settings()
    except Exception as exc:  # pydantic's validation error names the bad variable
        raise FarmError(f"bad configuration: {exc}") from None


def connect() -> Farm:
    """The farm's client, with its Redis reached once so a dead farm fails here, not mid-command."""
    from mlfarm.broker.connection import InsecureBrokerError, NoBrokerError
    from mlfarm.client import Farm

    try:
        farm = Farm(load_settings())
        farm.redis.ping()
        return farm
    except (NoBrokerError, InsecureBrokerError) as exc:
        raise FarmError(str(exc)) from None
    except Exception as exc:
        raise FarmError(f"cannot reach the farm's Redis: {exc}") from None


def job_status(farm: Farm, job_id: str) -> JobStatus:
    """The job's status, or a one-line FarmError for an unknown (or expired) job."""
    from mlfarm.client import JobNotFound

    try:
        return farm.status(job_id)
    except JobNotFound as exc:
        raise FarmError(str(exc)) from None


def patient_poll(farm: Farm, job_id: str) -> Callable[[], JobStatus]:
    """A status poll that waits out a Redis outage (the job goes on without us) instead of dying."""
    import redis

    last = [job_status(farm, job_id)]
    outage = [False]

    def poll() -> JobStatus:
        try:
            last[0] = job_status(farm, job_id)
            if outage[0]:
                err_console.print("[green]farm reachable again")
            outage[0] = False
        except redis.RedisError as exc:
            if not outage[0]:
                err_console.print(f"[yellow]farm unreachable ({exc}); still waiting for job {job_id}")
            outage[0] = True
        return last[0]

    return poll


def wait_and_exit(farm: Farm, job_id: str, as_json: bool) -> None:
    """Follow the job (a progress bar, or with ``as_json`` one JSON line at the end); exit 0 only if
    every frame is done."""
    from mlfarm.progress import follow

    poll = patient_poll(farm, job_id)
    if as_json:
        status = poll()
        while not status.finished:
            time.sleep(0.5)
            status = poll()
        click.echo(json.dumps(status.to_dict()))
    else:
        status = follow(poll, err_console)
        console.print(status.summary())
        for fs in status.failed_frames:
            console.print(f"  [red]{fs.reason}")
    sys.exit(0 if status.state == "done" else 1)
