"""Test fixtures: a real Redis server, real `mlfarm worker` processes, real EXR files.

Nothing is faked: the session starts its own redis-server (the same embedded binary `mlfarm up`
uses) on a free port with a password, and each test that needs a farm starts worker processes
with `python -m mlfarm worker`, exactly as a farm host would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest
import redis

from mlfarm.broker.embedded import EmbeddedRedis
from mlfarm.settings import Settings

TESTS = Path(__file__).resolve().parent
PLUGINS = TESTS / "plugins"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def terminate(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM (a warm shutdown for workers), then SIGKILL if it has not exited in ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def assert_no_unrecoverable_error(processes: list[MlfarmProcess]) -> None:
    """Celery logs "Unrecoverable error" when it gives up on a worker for an exception in its own
    machinery (a kombu slip while reconnecting, say): in any test, that is a worker lost."""
    for proc in processes:
        log = proc.log()
        at = log.find("Unrecoverable error")
        assert at < 0, f"{proc.log_path.stem}: Celery stopped the worker:\n{log[at:at + 3000]}"


class MlfarmProcess:
    """`python -m mlfarm <args>` in its own process, its output in a log file the test reads."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "mlfarm", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = 60, every: float = 0.05):
        """The first true value of ``predicate()``; an error with the log if the process exits first
        or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.log_path.stem} exited {self.proc.returncode} waiting for {what}:\n"
                                   f"{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout}s:\n{self.log()}")
            time.sleep(every)

    def wait_log(self, text: str, timeout: float = 60) -> None:
        self.wait_for(lambda: text in self.log(), repr(text), timeout)

    def stop(self, timeout: float = 30) -> int:
        code = terminate(self.proc, timeout)
        self._log.close()
        return code


class WorkerProcess(MlfarmProcess):
    """One `mlfarm worker` process."""

    def __init__(self, env: dict[str, str], log_path: Path, queues: str, name: str, concurrency: int = 1):
        self.name = name
        super().__init__(["worker", "--queues", queues, "--name", name, "--concurrency", str(concurrency),
                          "--loglevel", "INFO"], env, log_path)

    def wait_ready(self, timeout: float = 60) -> WorkerProcess:
        self.wait_log(f"{self.name} ready.", timeout)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class FarmHarness:
    """A clean farm for one test: flushed Redis, a storage root, and workers on demand."""

    def __init__(self, redis_url: str, root: Path):
        self.url = redis_url
        self.root = root
        self.storage = root / "storage"
        self.storage.mkdir()
        self.data = root / "data"
        self.workers: list[WorkerProcess] = []
        self.env_overrides: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
        env.update({
            "MLFARM_BROKER_URL": self.url,
            "MLFARM_STORAGE_ROOT": str(self.storage),
            "MLFARM_DATA_DIR": str(self.data),
            "MLFARM_MODELS_PATH": str(PLUGINS),
            "MLFARM_DEVICE": "cpu",
            "MLFARM_CONFIG": str(self.root / "no-config.toml"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_overrides)
        return env

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {"broker_url": self.url, "storage_root": self.storage,
                                     "data_dir": self.data, "models_path": str(PLUGINS), "device": "cpu"}
        for key, value in self.env_overrides.items():
            values[key.removeprefix("MLFARM_").lower()] = value
        values.update(overrides)
        return Settings(**values)

    def farm(self, **overrides: object):
        from mlfarm.client import Farm

        return Farm(self.settings(**overrides), self.url)

    def start_worker(self, queues: str = "interactive,gpu,cpu", concurrency: int = 1, wait: bool = True,
                     name: str | None = None) -> WorkerProcess:
        name = name or f"w{len(self.workers) + 1}@test"
        w = WorkerProcess(self.env, self.root / f"{name.split('@')[0]}.log", queues, name, concurrency)
        self.workers.append(w)
        return w.wait_ready() if wait else w

    def cli(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "mlfarm", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"mlfarm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def wait_job(self, job_id: str, timeout: float = 120):
        farm = self.farm()
        deadline = time.monotonic() + timeout
        while True:
            status = farm.status(job_id)
            if status.finished:
                return status
            if time.monotonic() > deadline:
                logs = "\n".join(w.log()[-3000:] for w in self.workers)
                raise TimeoutError(f"job {job_id} still {status.summary()} after {timeout}s\n"
                                   f"{self.broker_view(job_id)}\n{logs}")
            time.sleep(0.1)

    def broker_view(self, job_id: str) -> str:
        """What the broker holds for a job, and its unfinished frames' records: a stuck job's
        failure message says whether its frames' messages are queued, unacked or gone."""
        from mlfarm.broker.liveness import HOLDS_PREFIX
        from mlfarm.broker.reconcile import UNACKED, UNACKED_INDEX, parse_message, queue_keys

        client = self.farm().redis

        def ours(raw: str) -> str:
            message = parse_message(raw)
            return f"{message.id} {message.kwargs}" if message and message.kwargs.get("job_id") == job_id else ""

        lines = []
        for key in queue_keys(client):
            lines += [f"queue {key}: {m}" for raw in client.lrange(key, 0, -1) if (m := ours(raw))]
        taken_at = dict(client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
        lines += [f"unacked {tag} since {taken_at.get(tag)}: {m}"
                  for tag, raw in client.hgetall(UNACKED).items() if (m := ours(raw))]
        lines += [f"{key}: {client.get(key)}" for key in client.scan_iter(match=f"{HOLDS_PREFIX}*")]
        lines.append(f"now {time.time()}")
        records = self.farm().store.frame_records(job_id)
        lines += [f"frame {f}: {r}" for f, r in sorted(records.items()) if r.get("s") != "done"]
        return "\n".join(lines) or "the broker holds no message of this job"

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        assert_no_unrecoverable_error(self.workers)


@pytest.fixture
def farm(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[FarmHarness]:
    redis.Redis.from_url(redis_server.url).flushall()
    harness = FarmHarness(redis_server.url, tmp_path)
    yield harness
    harness.stop()


# --- frames -------------------------------------------------------------------------------
def sample_pixels(frame: int, width: int = 64, height: int = 48, channels: int = 4) -> np.ndarray:
    """Deterministic, frame-dependent scene-linear pixels (HDR values included)."""
    rng = np.random.default_rng(frame)
    img = rng.random((height, width, channels), dtype=np.float32) * 2.0
    if channels == 4:
        img[..., 3] = rng.random((height, width), dtype=np.float32)
    return img


def write_exr(path: Path, pixels: np.ndarray, channels: tuple[str, ...] | None = None, half: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, c = pixels.shape
    spec = oiio.ImageSpec(w, h, c, oiio.HALF if half else oiio.FLOAT)
    spec.channelnames = channels or ("R", "G", "B", "A")[:c]
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), spec), oiio.geterror()
    assert out.write_image(pixels)
    out.close()


def make_plate(folder: Path, frames: range | list[int], **kw: int) -> str:
    """EXR frames ``plate.####.exr`` with sample_pixels; returns the pattern."""
    for f in frames:
        write_exr(folder / f"plate.{f:04d}.exr", sample_pixels(f, **kw))
    return str(folder / "plate.####.exr")
