"""A farm on one machine: the embedded Redis plus local worker processes.

Used by ``mlfarm up`` (which keeps running until Ctrl-C) and ``mlfarm demo`` (which starts one
only if no farm is reachable). Workers are separate processes, exactly as on a real farm, kept by
the same supervisor as ``mlfarm worker --gpus`` (worker/supervisor.py).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import IO

from mlfarm.broker.embedded import EmbeddedRedis
from mlfarm.cpus import available_cpus, format_cpus, parse_cpus, split_cpus
from mlfarm.settings import Settings
from mlfarm.worker.supervisor import Child, Supervisor

log = logging.getLogger(__name__)


class LocalFarm:
    def __init__(self, settings: Settings, workers: int = 1, queues: str = "interactive,gpu,cpu,train",
                 concurrency: int = 1, log_file: Path | None = None):
        self.settings = settings
        self.n_workers = workers
        self.queues = queues
        self.concurrency = concurrency
        self.log_file = log_file
        self.redis: EmbeddedRedis | None = None
        self.supervisor: Supervisor | None = None  # the workers: the same supervisor as `mlfarm worker --gpus`
        self.url = settings.broker_url
        self._log: IO[bytes] | None = None

    def start(self) -> LocalFarm:
        if not self.url:
            self.redis = EmbeddedRedis.start(self.settings.data_dir / "redis")
            self.redis.write_state(self.settings.embedded_state_file)
            self.url = self.redis.url
            log.info("embedded Redis on 127.0.0.1:%d", self.redis.port)
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - kept open for the workers' lifetime
        env = {**os.environ, "MLFARM_BROKER_URL": self.url, "MLFARM_STORAGE_ROOT": str(self.settings.storage_root)}
        # Several workers each get their own share of the cores, as `mlfarm worker --gpus` gives each
        # GPU's: each sizes its threads from its share (worker/sizing.py) instead of every one taking
        # every core.
        cores = parse_cpus(self.settings.cpus) if self.settings.cpus else available_cpus()
        shares = split_cpus(self.n_workers, cores) if 1 < self.n_workers <= len(cores) else []
        children = []
        for i in range(self.n_workers):
            name = f"local{i + 1}@{os.uname().nodename}"
            argv = [sys.executable, "-m", "mlfarm", "worker", "--queues", self.queues,
                    "--concurrency", str(self.concurrency), "--name", name]
            if shares:
                argv += ["--cpus", format_cpus(shares[i])]
            children.append(Child(gpu=None, name=name, argv=argv, env=env, output=self._log))
        self.supervisor = Supervisor(children, restart_only_hung=True)
        self.supervisor.start()
        return self

    def tend(self) -> bool:
        """Start again any worker that ended itself over a stuck frame (worker/watchdog.py), then say
        whether everything runs. Not a plain query: ``mlfarm up`` calls it as its keep-alive."""
        running = self.supervisor is not None and self.supervisor.poll() and self.supervisor.fatal is None
        return running and (self.redis is None or self.redis.process is None or self.redis.process.poll() is None)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: workers finish (or hand back) their chunk, then Redis stops."""
        if self.supervisor is not None:
            self.supervisor.stop(timeout)
        if self.redis is not None:
            self.redis.stop()
            self.settings.embedded_state_file.unlink(missing_ok=True)
        if self._log:
            self._log.close()

    def __enter__(self) -> LocalFarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
