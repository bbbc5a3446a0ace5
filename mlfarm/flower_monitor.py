"""`mlfarm flower`: Flower on the farm's broker, with the farm's settings and auth.

Flower runs in this process on the same Celery app the workers and the submit client use (JSON
only, the farm's queues and transport options), so it needs no configuration of its own. Flower
lets anyone who reaches it revoke tasks and shut workers down, so it is refused without a
password unless it listens on this machine only. The password is handed to Flower through its
environment, not its command line, where `ps` would show it to every user of the host.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from mlfarm.broker.connection import is_local_host
from mlfarm.settings import Settings

log = logging.getLogger(__name__)

AUTH_HINT = (
    "set MLFARM_FLOWER_BASIC_AUTH=user:password (several users: user1:pw1,user2:pw2), "
    "or MLFARM_FLOWER_ADDRESS=127.0.0.1 to keep Flower on this machine"
)


TASK_COLUMNS = "name,kwargs,state,received,runtime,worker,uuid"


class FlowerConfigError(ValueError):
    """Flower would be exposed unsafely or is misconfigured; the message says what to set."""


@dataclass(frozen=True)
class FlowerLaunch:
    """What Flower is started with: its command-line options and the credentials for its environment."""

    address: str
    port: int
    basic_auth: str | None
    db: Path | None
    save_interval_ms: int

    def argv(self) -> list[str]:
        args = ["flower", f"--address={self.address}", f"--port={self.port}",
                # Flower executes ./flowerconfig.py if one exists: configuration comes from mlfarm only.
                f"--conf={os.devnull}",
                # The task list shows each chunk's arguments (job, name, model, frames, output) by default.
                f"--tasks_columns={TASK_COLUMNS}"]
        if self.db is not None:
            args += ["--persistent=True", f"--db={self.db}", f"--state_save_interval={self.save_interval_ms}"]
        return args


def check_basic_auth(value: str) -> str:
    users = [u.strip() for u in value.split(",")]
    for u in users:
        name, sep, password = u.partition(":")
        if not (sep and name and password):
            raise FlowerConfigError(f"MLFARM_FLOWER_BASIC_AUTH: expected user:password, got {u.split(':')[0]!r}...")
    return ",".join(users)


def plan_flower(settings: Settings, broker: str) -> FlowerLaunch:
    """Where and how Flower listens; refuses an unauthenticated Flower anyone could reach."""
    auth = check_basic_auth(settings.flower_basic_auth) if settings.flower_basic_auth else None
    if auth:
        address = settings.flower_address or "0.0.0.0"
    else:
        local_farm = is_local_host(urlparse(broker).hostname) or urlparse(broker).scheme == "unix"
        address = settings.flower_address or ("127.0.0.1" if local_farm else "")
        if not address:
            raise FlowerConfigError(f"refusing to start Flower without a password for a farm's broker: {AUTH_HINT}")
        if not is_local_host(address):
            raise FlowerConfigError(
                f"refusing to start Flower on {address} without a password (anyone who reaches it could stop "
                f"workers and revoke jobs): {AUTH_HINT}")
    db = None
    if settings.flower_persistent:
        db = settings.data_dir / "flower" / "flower.db"
    return FlowerLaunch(address=address, port=settings.flower_port, basic_auth=auth, db=db,
                        save_interval_ms=settings.flower_save_interval * 1000)


def run_flower(settings: Settings) -> None:
    """Run Flower in this process until SIGTERM/Ctrl-C (it saves its history on the way out)."""
    from mlfarm.broker.celery_app import make_celery
    from mlfarm.broker.connection import broker_url

    url = broker_url(settings)
    launch = plan_flower(settings, url)
    if launch.db is not None:
        launch.db.parent.mkdir(parents=True, exist_ok=True)
    os.environ.pop("FLOWER_BASIC_AUTH", None)
    if launch.basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = launch.basic_auth
    log.info("Flower on %s:%d (%s), broker %s", launch.address, launch.port,
             "basic auth" if launch.basic_auth else "no auth, this machine only", url.split("@")[-1])
    app = make_celery(settings, url)
    code = app.start(launch.argv())
    if code:
        raise SystemExit(code)
