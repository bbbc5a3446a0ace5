"""A worker killed with SIGKILL mid-chunk: its frames are redelivered and finished elsewhere,
and no partial EXR is ever visible at an output path."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import redis

from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path

from conftest import make_plate, sample_pixels

FAST_REDELIVERY = {
    "MLFARM_FRAME_TIME_LIMIT": "3",
    "MLFARM_CHUNK_SLACK": "2",
    "MLFARM_VISIBILITY_TIMEOUT": "12",
    "MLFARM_RESTORE_INTERVAL": "1",
}


class OutputWatcher(threading.Thread):
    """Polls the output folder; every visible .exr must read back whole, every time."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder = folder
        self.bad: list[str] = []
        self.checked = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.folder.exists():
                for p in self.folder.glob("*.exr"):
                    try:
                        read_image(str(p))
                        self.checked += 1
                    except Exception as exc:
                        self.bad.append(f"{p.name}: {exc}")
            time.sleep(0.01)


def test_killed_worker_chunk_is_redelivered_and_completed(farm):
    farm.env_overrides.update(FAST_REDELIVERY)
    frames = list(range(1, 10))
    plate = make_plate(farm.storage / "plate", frames, width=320, height=180)
    out_dir = farm.storage / "out"
    out = str(out_dir / "o.####.exr")
    victim = farm.start_worker(name="victim@test")
    client = farm.farm()
    watcher = OutputWatcher(out_dir)
    watcher.start()
    spec = client.submit("slow", plate, out, frames, {"seconds": 0.8}, chunk=3)
    victim.wait_log(f"job {spec.id} slow: frames 1-3")
    time.sleep(1.2)  # the first frame is written, the second is in the model
    victim.kill()
    killed_at = client.status(spec.id)
    assert killed_at.counts["running"] >= 1, killed_at.summary()

    rescuer = farm.start_worker(name="rescuer@test")
    status = farm.wait_job(spec.id, timeout=90)
    watcher.stop.set()
    watcher.join()

    assert status.state == "done", status.summary()
    assert watcher.bad == [] and watcher.checked > 0
    by_frame = {f.frame: f for f in status.frames}
    # The worker runs two chunks side by side (MLFARM_WORKER_THREADS), so which of their first
    # frames was written before the kill depends on the lane's order: find them in the records.
    finished = [f for f in frames if by_frame[f].worker.startswith("victim@test")]
    in_flight = [fs.frame for fs in killed_at.frames if fs.state == "running"]
    assert finished and in_flight, (finished, in_flight)
    assert all(by_frame[f].attempts == 1 for f in finished)  # done once: never rendered again
    for f in in_flight:  # killed mid-chunk: redelivered and rendered by the rescuer
        assert by_frame[f].attempts == 2 and by_frame[f].worker.startswith("rescuer@test"), by_frame[f]
    skipped = sum(int(n) for n in re.findall(r"(\d+) skipped", rescuer.log()))
    assert skipped >= 1  # a redelivered chunk skipped the frame the victim had already written
    for f in frames:
        got = read_image(frame_path(out, f)).rgba(4)
        np.testing.assert_array_equal(got, sample_pixels(f, 320, 180).astype(np.float16).astype(np.float32))
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) == [
        f"o.{f:04d}.exr" for f in frames]


def test_a_killed_workers_frames_are_queued_again_long_before_the_broker_would_redeliver(farm):
    """SIGKILL (the OOM killer, a host lost) acknowledges nothing, and Redis redelivers a chunk only
    after MLFARM_VISIBILITY_TIMEOUT (65 min by default, here left so). The dead worker's heartbeat
    expires instead, and a living worker's reconciler queues the frames it was rendering again."""
    from mlfarm.broker.liveness import alive_key
    from mlfarm.nuke_submit.results import Progress, progress_label

    farm.env_overrides.update({"MLFARM_WORKER_DEAD_AFTER": "4", "MLFARM_VISIBILITY_TIMEOUT": "3900"})
    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames, width=160, height=90)
    out = str(farm.storage / "out" / "o.####.exr")
    victim = farm.start_worker(name="victim@orphans")
    client = farm.farm()
    spec = client.submit("slow", plate, out, frames, {"seconds": 1.0}, chunk=3)
    victim.wait_log(f"job {spec.id} slow: frames 1-3")
    time.sleep(1.5)
    victim.kill()
    killed_at = client.status(spec.id)
    in_flight = [fs.frame for fs in killed_at.frames if fs.state == "running"]
    assert in_flight, killed_at.summary()
    dead_name = next(fs.worker for fs in killed_at.frames if fs.state == "running")
    assert redis.Redis.from_url(farm.url).exists(alive_key(dead_name)), "the victim beat while it lived"
    deadline = time.monotonic() + 30  # its key outlives it by MLFARM_WORKER_DEAD_AFTER at most
    while not client.status(spec.id).silent:
        assert time.monotonic() < deadline, client.status(spec.id).summary()
        time.sleep(0.2)
    silent = client.status(spec.id)
    assert silent.silent == [dead_name] and f"on {dead_name}, which stopped responding" in silent.summary()
    assert f"{len(in_flight)} on a worker not responding" in progress_label(Progress.from_status(silent))
    shown = farm.cli("status", spec.id, check=True).stdout
    assert "not responding" in shown and "victim@orphans" in shown, shown

    rescuer = farm.start_worker(name="rescuer@orphans")
    started = time.monotonic()
    status = farm.wait_job(spec.id, timeout=90)
    took = time.monotonic() - started

    assert status.state == "done", status.summary()
    by_frame = {f.frame: f for f in status.frames}
    for f in in_flight:
        assert by_frame[f].attempts == 2 and by_frame[f].worker.startswith("rescuer@orphans"), by_frame[f]
    assert f"were running on worker {dead_name}, which has sent no heartbeat" in rescuer.log()
    assert "runs alone" in rescuer.log()  # its frames may be what killed the victim
    assert took < 60, took  # the victim's lock and heartbeat expire within seconds; the broker waits an hour
    for f in frames:
        got = read_image(frame_path(out, f)).rgba(4)
        np.testing.assert_array_equal(got, sample_pixels(f, 160, 90).astype(np.float16).astype(np.float32))


def test_a_failed_heartbeat_is_tried_again_within_a_second_not_a_beat_later():
    """After a Redis outage longer than a beat's lifetime every alive key has expired: a living
    worker's must be back soon after Redis is, before the reconciler judges anyone dead again."""
    from mlfarm.worker.heartbeat import beating

    calls: list[float] = []

    def beat() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise redis.ConnectionError("Redis is away")

    start = time.monotonic()
    with beating(beat, interval=3.0, what="test"):
        while len(calls) < 4 and time.monotonic() - start < 20:
            time.sleep(0.05)
    gaps = [round(b - a, 1) for a, b in zip([start, *calls], calls)]
    assert len(calls) == 4, gaps
    assert gaps[0] >= 2.9 and 0.9 <= gaps[1] <= 2.0 and 0.9 <= gaps[2] <= 2.0 and gaps[3] >= 2.9, gaps
