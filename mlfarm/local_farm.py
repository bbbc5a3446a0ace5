"""A farm on one machine: the embedded Redis plus local worker processes.

Used by ``mlfarm up`` (which keeps running until Ctrl-C) and ``mlfarm demo`` (which starts one
only if no farm is reachable). Workers are separate processes, exactly as on a real farm.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from mlfarm.broker.embedded import EmbeddedRedis
from mlfarm.settings import Settings

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
        self.workers: list[subprocess.Popen] = []
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
        self.workers = [self._start_worker(i) for i in range(self.n_workers)]
        return self

    def _start_worker(self, i: int) -> subprocess.Popen:
        env = {**os.environ, "MLFARM_BROKER_URL": self.url, "MLFARM_STORAGE_ROOT": str(self.settings.storage_root)}
        cmd = [sys.executable, "-m", "mlfarm", "worker", "--queues", self.queues,
               "--concurrency", str(self.concurrency), "--name", f"local{i + 1}@{os.uname().nodename}"]
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                stderr=subprocess.STDOUT if self._log else None)

    def tend(self) -> bool:
        """Start again any worker that ended itself over a stuck frame (worker/watchdog.py), then say
        whether everything runs. Not a plain query: ``mlfarm up`` calls it as its keep-alive."""
        from mlfarm.worker.watchdog import EXIT_HUNG

        for i, w in enumerate(self.workers):
            if w.poll() == EXIT_HUNG:
                log.warning("worker local%d failed a frame stuck past its time limit and ended; starting it again",
                            i + 1)
                self.workers[i] = self._start_worker(i)
        return all(w.poll() is None for w in self.workers) and (
            self.redis is None or self.redis.process is None or self.redis.process.poll() is None)

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: workers finish (or hand back) their chunk, then Redis stops."""
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            try:
                w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        if self.redis is not None:
            self.redis.stop()
            self.settings.embedded_state_file.unlink(missing_ok=True)
        if self._log:
            self._log.close()

    def __enter__(self) -> LocalFarm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
