"""Faults a wrangler meets: Redis restarted or gone for a while, storage read-only or full,
corrupt plates, workers killed over and over. The goal in every case: nothing lost, nothing corrupt,
every failure with a reason."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from mlfarm.broker.embedded import EmbeddedRedis, free_port
from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path

from conftest import FarmHarness, make_plate, sample_pixels, write_exr


class RestartableRedis:
    """A real redis-server we can stop and start again on the same port, password and AOF."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.password = "faults-" + os.urandom(6).hex()
        self.server: EmbeddedRedis | None = None

    def start(self) -> None:
        self.server = EmbeddedRedis.start(self.folder, port=self.port, password=self.password)

    def stop(self) -> None:
        if self.server:
            self.server.stop()

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"


@pytest.fixture
def own_farm(tmp_path: Path) -> Iterator[tuple[FarmHarness, RestartableRedis]]:
    server = RestartableRedis(tmp_path / "redis")
    server.start()
    harness = FarmHarness(server.url, tmp_path)
    yield harness, server
    harness.stop()
    server.stop()


def wait_done_at_least(harness: FarmHarness, job_id: str, n: int, timeout: float = 60) -> None:
    farm = harness.farm()
    deadline = time.monotonic() + timeout
    while farm.status(job_id).completed < n:
        assert time.monotonic() < deadline, farm.status(job_id).summary()
        time.sleep(0.05)


def wait_until_taken(client, job_id: str, timeout: float = 30) -> None:
    """Until a worker has taken a chunk of the job: its message is in kombu's unacked hash."""
    from mlfarm.broker.reconcile import UNACKED, parse_message

    deadline = time.monotonic() + timeout
    while not any((m := parse_message(raw)) and m.kwargs["job_id"] == job_id for raw in client.hvals(UNACKED)):
        assert time.monotonic() < deadline, f"no worker took a chunk of job {job_id}"
        time.sleep(0.05)
    time.sleep(0.5)  # and registered it


def assert_outputs_whole(out: str, frames: list[int], **kw: int) -> None:
    folder = Path(out).parent
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == sorted(Path(frame_path(out, f)).name for f in frames)
    for f in frames:
        got = read_image(frame_path(out, f)).rgba(4)
        np.testing.assert_array_equal(got, sample_pixels(f, **kw).astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("outage_s", [2, 30])
def test_redis_restart_or_outage_mid_job_loses_nothing(own_farm, outage_s):
    harness, server = own_farm
    if outage_s > 5:  # longer than a heartbeat lives: no living worker may be taken for dead after it
        harness.env_overrides["MLFARM_WORKER_DEAD_AFTER"] = "8"
    harness.start_worker(name="a@faults")
    harness.start_worker(name="b@faults")
    frames = list(range(1, 41))
    plate = make_plate(harness.storage / "plate", frames)
    out = str(harness.storage / "out" / "o.####.exr")
    spec = harness.farm().submit("slow", plate, out, frames, {"seconds": 0.1}, chunk=2)
    watcher = subprocess.Popen([sys.executable, "-m", "mlfarm", "status", spec.id, "--watch", "--json"],
                               env=harness.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = harness.farm().redis
    deadline = time.monotonic() + 60
    while not any(c["name"].endswith(f":{watcher.pid}") for c in client.client_list()):
        assert time.monotonic() < deadline and watcher.poll() is None, watcher.communicate()
        time.sleep(0.05)
    wait_done_at_least(harness, spec.id, 6)
    server.stop()  # SIGTERM: Redis flushes its AOF, as a restart by a wrangler or systemd would
    if outage_s > 5:
        # While the farm is gone, a submission fails fast and says why.
        t = time.monotonic()
        proc = harness.cli("submit", "--input", plate, "--frames", "1", "--model", "slow",
                           "--output", str(harness.storage / "o2" / "o.####.exr"))
        assert proc.returncode == 2
        assert "cannot reach the farm's Redis" in proc.stderr
        assert time.monotonic() - t < 15
    time.sleep(outage_s)
    server.start()
    status = harness.wait_job(spec.id, timeout=180)
    assert status.state == "done", status.summary()
    assert status.completed == 40
    assert_outputs_whole(out, frames)
    for w in harness.workers:
        assert w.proc.poll() is None, f"worker {w.name} died:\n{w.log()[-3000:]}"
        assert "which has sent no heartbeat" not in w.log(), w.log()[-3000:]
    stdout, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, stderr
    assert json.loads(stdout)["counts"]["done"] == 40
    if outage_s > 5:
        assert "farm unreachable" in stderr


def test_a_chunk_a_worker_holds_for_later_is_not_lost_when_its_broker_connection_breaks(own_farm):
    """A chunk that retries after a broker error comes back with a countdown: the worker holds it
    until then. If its connection breaks meanwhile, Celery drops the held copy (the broker is
    expected to hand it out again) and kombu, with Redis away, cannot put it back: it waits in the
    unacked hash for MLFARM_VISIBILITY_TIMEOUT (an hour). The reconciler sees no living worker
    holds it and queues its frames again."""
    from mlfarm.broker.celery_app import CHUNK_TASK, make_celery
    from mlfarm.broker.jobs import JobSpec

    harness, server = own_farm
    harness.env_overrides.update({"MLFARM_WORKER_DEAD_AFTER": "4", "MLFARM_RECONCILE_GRACE": "1",
                                  "MLFARM_RECONCILE_INTERVAL": "2"})
    worker = harness.start_worker(name="holder@faults")
    client = harness.farm()
    plate = make_plate(harness.storage / "plate", [1, 2])
    spec = JobSpec(model="passthrough", input=plate, output=str(harness.storage / "out" / "o.####.exr"),
                   frames=[1, 2], queue="cpu")
    client.store.create(spec, unsent=False)
    app = make_celery(harness.settings(), harness.url)
    app.send_task(CHUNK_TASK, kwargs={"job_id": spec.id, "model": spec.model, "frames": "1,2"}, queue="cpu",
                  countdown=60)
    wait_until_taken(client.redis, spec.id)
    server.stop()
    time.sleep(10)  # the worker notices within seconds, while Redis is still away
    server.start()
    status = harness.wait_job(spec.id, timeout=40)  # the countdown (60 s) has not run out
    assert status.state == "done", status.summary()
    assert all(f.attempts == 1 for f in status.frames)
    worker.wait_log(f"job {spec.id}: frames 1,2 had no chunk message that a living worker holds")
    assert_outputs_whole(str(harness.storage / "out" / "o.####.exr"), [1, 2])
    # Closing the broken connection failed inside kombu (worker/consumer.py): the worker lives on
    # (and the harness finds no "Unrecoverable error" in its log).
    assert worker.proc.poll() is None, worker.log()[-3000:]


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this machine cannot mount test filesystems (needs root): {proc.stderr.strip()}")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for m in reversed(mounted):
        subprocess.run(["umount", "-l", str(m)], check=False)


def test_read_only_storage_fails_frames_with_the_reason(farm, mounts):
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [1, 2])
    target = farm.storage / "ro"
    target.mkdir()
    _mount("--bind", str(target), str(target))
    mounts.append(target)
    _mount("-o", "remount,ro,bind", str(target))
    spec = farm.farm().submit("passthrough", plate, str(target / "shot" / "o.####.exr"), [1, 2])
    status = farm.wait_job(spec.id)
    assert status.state == "failed" and status.counts["failed"] == 2
    assert all("Read-only file system" in f.reason for f in status.failed_frames), status.failed_frames
    assert list(target.iterdir()) == []


def test_full_storage_fails_frames_and_leaves_nothing_corrupt(farm, mounts):
    farm.start_worker()
    frames = list(range(1, 11))
    plate = make_plate(farm.storage / "plate", frames, width=96, height=96)
    target = farm.storage / "small"
    target.mkdir()
    _mount("-t", "tmpfs", "-o", "size=160k", "tmpfs", str(target))
    mounts.append(target)
    out = str(target / "o.####.exr")
    spec = farm.farm().submit("passthrough", plate, out, frames, chunk=5)
    status = farm.wait_job(spec.id)
    assert status.state == "failed"
    assert 0 < status.counts["done"] < 10, status.summary()
    assert all("No space left on device" in f.reason for f in status.failed_frames), status.failed_frames
    done = [f.frame for f in status.frames if f.state == "done"]
    assert sorted(p.name for p in target.iterdir()) == sorted(Path(frame_path(out, f)).name for f in done)
    for f in done:
        read_image(frame_path(out, f))  # every file that exists is whole


def test_the_gpu_compressing_writer_on_a_full_disk_says_so_and_leaves_nothing_half_written(mounts, tmp_path):
    """mlfarm/exr/gpu.py writes the file itself: a full disk must give the same clear reason, and no
    partial file under the output name or beside it (run on CPU tensors: the same writing code)."""
    import torch

    from mlfarm.exr import gpu as gpu_exr
    from mlfarm.exr.io import FrameError

    target = tmp_path / "small"
    target.mkdir()
    _mount("-t", "tmpfs", "-o", "size=160k", "tmpfs", str(target))
    mounts.append(target)
    rng = np.random.default_rng(2)
    written = []
    with pytest.raises(FrameError, match="No space left on device") as failure:
        for f in range(1, 40):
            noise = torch.from_numpy(rng.standard_normal((96, 96)).astype(np.float16))  # incompressible-ish
            gpu_exr.write_zips(str(target / f"o.{f:04d}.exr"), target, [(c, noise) for c in "RGBA"], {"f": f})
            written.append(f)
    assert "o.0" in str(failure.value) and ".partial-" not in str(failure.value)
    assert 0 < len(written) < 39
    assert sorted(p.name for p in target.iterdir()) == [f"o.{f:04d}.exr" for f in written]
    for f in written:
        read_image(str(target / f"o.{f:04d}.exr"))  # every file that exists is whole


# --- corrupt plates --------------------------------------------------------------------------
def _header_end(data: bytes) -> int:
    """Offset just past an EXR header's attribute list (its terminating null byte)."""
    i = 8
    while data[i] != 0:
        name_end = data.index(b"\0", i)
        type_end = data.index(b"\0", name_end + 1)
        size = struct.unpack_from("<i", data, type_end + 1)[0]
        i = type_end + 5 + size
    return i + 1


def corrupt_variants(path: Path, n: int, rng: random.Random) -> list[str]:
    good = path.read_bytes()
    start = _header_end(good)
    kinds = []
    for i in range(n):
        kind = ["truncated", "bitflip", "empty", "png", "huge"][i % 5]
        data = bytearray(good)
        if kind == "truncated":
            data = data[: rng.randrange(start + 8, len(data) - 1)]
        elif kind == "bitflip":
            for _ in range(16):
                pos = rng.randrange(start + 8 * 48, len(data))  # compressed pixel chunks, past the offsets
                data[pos] ^= 1 << rng.randrange(8)
        elif kind == "empty":
            data = bytearray()
        elif kind == "png":
            data = bytearray(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200)))
        else:
            key = b"dataWindow\0box2i\0"
            at = data.index(key) + len(key) + 4
            struct.pack_into("<iiii", data, at, 0, 0, 199_999, 199_999)
        path.with_name(f"bad.{i + 1:04d}.exr").write_bytes(bytes(data))
        kinds.append(kind)
    return kinds


def test_a_hundred_corrupt_inputs_fail_with_reasons_and_workers_stay_healthy(farm):
    worker = farm.start_worker()
    folder = farm.storage / "bad"
    write_exr(folder / "good.exr", sample_pixels(1, 64, 48), half=True)
    kinds = corrupt_variants(folder / "good.exr", 100, random.Random(7))
    rss_before = psutil.Process(worker.proc.pid).memory_info().rss
    client = farm.farm()
    spec = client.submit("passthrough", str(folder / "bad.####.exr"), str(farm.storage / "out" / "o.####.exr"),
                         list(range(1, 101)), chunk=5)
    status = farm.wait_job(spec.id, timeout=240)
    bitflips_read = [f.frame for f in status.frames if f.state == "done"]
    # Flipped bits in zip-compressed chunks are caught by the decompressor; all must be refused.
    assert status.counts["failed"] == 100, (status.summary(), bitflips_read)
    for fs in status.failed_frames:
        kind = kinds[fs.frame - 1]
        assert fs.reason.startswith(f"frame {fs.frame}: {frame_path(spec.input, fs.frame)}: "), fs.reason
        assert len(fs.reason) > len(f"frame {fs.frame}: {frame_path(spec.input, fs.frame)}: ") + 5
        assert "\n" not in fs.reason
        if kind == "huge":  # OpenImageIO's own size limit, or ours, names the absurd size
            assert "200000x200000" in fs.reason
    assert worker.proc.poll() is None
    rss_after = psutil.Process(worker.proc.pid).memory_info().rss
    print(f"worker RSS before {rss_before / 2**20:.0f} MiB, after 100 corrupt frames {rss_after / 2**20:.0f} MiB")
    assert rss_after - rss_before < 300 * 2**20, (rss_before, rss_after)
    # And the same worker still renders good frames.
    plate = make_plate(farm.storage / "plate", [1, 2])
    spec = client.submit("passthrough", plate, str(farm.storage / "ok" / "o.####.exr"), [1, 2])
    assert farm.wait_job(spec.id).state == "done"


# --- workers killed again and again ----------------------------------------------------------
def test_workers_killed_repeatedly_during_a_500_frame_job(farm):
    farm.env_overrides.update({"MLFARM_FRAME_TIME_LIMIT": "3", "MLFARM_CHUNK_SLACK": "2",
                               "MLFARM_VISIBILITY_TIMEOUT": "12", "MLFARM_RESTORE_INTERVAL": "1"})
    frames = list(range(1, 501))
    plate = make_plate(farm.storage / "plate", frames, width=16, height=16)
    out = str(farm.storage / "out" / "o.####.exr")
    farm.start_worker(name="k1@faults")
    farm.start_worker(name="k2@faults")
    # 0.05 s a frame in the model: the job lasts at least 12 s on any machine, long enough for its kills.
    spec = farm.farm().submit("slow", plate, out, frames, {"seconds": 0.05}, chunk=3)
    rng = random.Random(3)
    kills = 0
    for round_ in range(6):
        time.sleep(rng.uniform(0.5, 1.5))
        if farm.farm().status(spec.id).finished:
            break
        victim = next(w for w in farm.workers if w.proc.poll() is None)
        victim.kill()
        kills += 1
        farm.start_worker(name=f"r{round_}@faults")
    status = farm.wait_job(spec.id, timeout=240)
    print(f"{kills} workers killed with SIGKILL; frames attempted twice: "
          f"{sum(1 for f in status.frames if f.attempts > 1)}")
    assert kills >= 3
    assert status.state == "done", status.summary()
    # A worker killed after renaming a frame into place but before recording it leaves a whole
    # file with the frame's key: the retry finds it (``cached``) instead of rendering it again.
    assert status.completed == 500, status.summary()
    assert all(f.state == "done" and f.attempts >= 1 for f in status.frames)
    assert_outputs_whole(out, frames, width=16, height=16)


def test_frames_whose_message_was_lost_are_queued_again_and_nothing_is_doubled(farm):
    """A chunk message lost by the broker (Redis died between BRPOP and kombu's unacked write)
    leaves frames queued forever unless someone notices: the workers' reconciler does."""
    from mlfarm.broker.jobs import JobSpec

    farm.env_overrides.update({"MLFARM_RECONCILE_GRACE": "1", "MLFARM_RECONCILE_INTERVAL": "2"})
    client = farm.farm()
    plate = make_plate(farm.storage / "plate", range(1, 7))
    lost = JobSpec(model="passthrough", input=plate, output=str(farm.storage / "lost" / "o.####.exr"),
                   frames=[1, 2, 3], queue="cpu")
    client.store.create(lost, unsent=False)  # the record exists, its messages never reached a queue
    backlog = client.submit("passthrough", plate, str(farm.storage / "backlog" / "o.####.exr"), [4, 5, 6],
                            chunk=1)
    time.sleep(1.5)  # both are now older than the grace; only the first is uncovered
    worker = farm.start_worker()
    assert farm.wait_job(lost.id, timeout=60).state == "done"
    assert farm.wait_job(backlog.id).state == "done"
    assert all(f.attempts == 1 for f in client.status(backlog.id).frames)
    worker.wait_log(f"job {lost.id}: frames 1,2,3 had no chunk message")
    assert worker.log().count("had no chunk message") == 1  # the backlog job's queued messages counted


def test_frames_lost_just_before_a_reconnect_are_found_once_the_grace_has_passed(farm):
    """After a (re)connection the reconciler looks at once, when frames lost in the outage are still
    younger than the grace, and again once the grace has passed: a lost message costs seconds, not
    MLFARM_RECONCILE_INTERVAL (found by the Redis-restart test, with three chunks in flight a worker)."""
    from mlfarm.broker.jobs import JobSpec

    farm.env_overrides.update({"MLFARM_RECONCILE_GRACE": "8", "MLFARM_RECONCILE_INTERVAL": "300"})
    client = farm.farm()
    plate = make_plate(farm.storage / "plate", range(1, 4))
    worker = farm.start_worker()  # connecting kicks its reconciler: the first look comes 5 s later
    lost = JobSpec(model="passthrough", input=plate, output=str(farm.storage / "lost" / "o.####.exr"),
                   frames=[1, 2, 3], queue="cpu")
    client.store.create(lost, unsent=False)  # the record exists, its messages never reached a queue
    status = farm.wait_job(lost.id, timeout=60)  # far less than the 300 s interval
    assert status.state == "done", status.summary()
    worker.wait_log(f"job {lost.id}: frames 1,2,3 had no chunk message")


def test_a_cold_shutdown_mid_chunk_hands_its_frames_back(farm):
    """SIGQUIT (or Ctrl-C twice) makes Celery abort the running chunk: its unfinished frames must go
    back on the queue at once, not stay 'running' until the reconciler notices."""
    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames)
    victim = farm.start_worker(name="quit@faults")
    spec = farm.farm().submit("slow", plate, str(farm.storage / "out" / "o.####.exr"), frames,
                              {"seconds": 0.7}, chunk=6)
    victim.wait_log(f"job {spec.id} slow: frames 1-6")
    time.sleep(1.0)
    victim.proc.send_signal(signal.SIGQUIT)
    victim.proc.wait(30)
    assert "queued again" in victim.log()
    farm.start_worker(name="after@faults")
    status = farm.wait_job(spec.id, timeout=60)  # far less than the reconciler's 300 s interval
    assert status.state == "done", status.summary()


def test_a_poison_frame_fails_after_max_attempts_instead_of_killing_every_worker(farm):
    farm.env_overrides.update({"MLFARM_FRAME_TIME_LIMIT": "3", "MLFARM_CHUNK_SLACK": "2",
                               "MLFARM_VISIBILITY_TIMEOUT": "8", "MLFARM_RESTORE_INTERVAL": "1",
                               "MLFARM_MAX_ATTEMPTS": "2"})
    frames = [1, 2, 3]
    make_plate(farm.storage / "plate", frames)
    write_exr(farm.storage / "plate" / "plate.0002.exr", np.full((48, 64, 4), 9.0, np.float32))
    out = str(farm.storage / "out" / "o.####.exr")
    spec = farm.farm().submit("crash", str(farm.storage / "plate" / "plate.####.exr"), out, frames, chunk=1)
    deadline = time.monotonic() + 120
    while not farm.farm().status(spec.id).finished:
        assert time.monotonic() < deadline, farm.farm().status(spec.id).summary()
        for w in farm.workers:
            if w.proc.poll() is not None:
                farm.workers.remove(w)
        if not farm.workers:  # like a supervisor or compose restarting a dead container
            farm.start_worker(name=f"p{int(time.monotonic() * 1000)}@faults", wait=False)
        time.sleep(0.2)
    status = farm.farm().status(spec.id)
    assert status.state == "failed" and status.counts["done"] == 2, status.summary()
    (poisoned,) = status.failed_frames
    assert poisoned.frame == 2 and "gave up after 2 attempts" in poisoned.reason


def test_lost_frame_detection_reads_real_broker_messages_for_chunks_and_training(farm):
    """No worker runs here: messages stay in the queues, exactly as kombu wrote them."""
    from mlfarm.broker.celery_app import TRAIN_TASK, make_celery
    from mlfarm.broker.dispatch import enqueue
    from mlfarm.broker.jobs import JobSpec
    from mlfarm.broker.reconcile import find_lost

    client = farm.farm()
    app = make_celery(farm.settings(), farm.url)
    render = JobSpec(model="passthrough", input="/s/p.####.exr", output=str(farm.storage / "o.####.exr"),
                     frames=list(range(1, 9)), chunk=2, queue="cpu")
    train = JobSpec(model="grade", input="", output="", frames=[1, 2, 3], kind="train", queue="train")
    for spec in (render, train):
        client.store.create(spec, unsent=False)
    enqueue(app, farm.settings(), render, [1, 2, 5, 6])  # chunks 3-4 and 7-8 "lost"
    time.sleep(0.3)
    assert find_lost(client.redis, client.store, grace=0.1) == {render.id: [3, 4, 7, 8], train.id: [1, 2, 3]}
    app.send_task(TRAIN_TASK, kwargs={"job_id": train.id}, queue="train")
    assert find_lost(client.redis, client.store, grace=0.1) == {render.id: [3, 4, 7, 8]}
    assert find_lost(client.redis, client.store, grace=60) == {}  # too young to call lost
    client.cancel(render.id)
    assert find_lost(client.redis, client.store, grace=0.1) == {}


def take_without_acknowledging(app, queue: str):
    """Take one message off ``queue`` through kombu, as a worker's consumer does (into the unacked
    hash, stamped with the time), then drop it the way a worker does that lost its broker
    connection or was killed: kombu does not put it back."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None, f"no message on queue {queue}"
        channel.do_restore = False
        return message


def test_a_taken_message_covers_its_frames_only_while_a_living_worker_holds_it(farm):
    """No worker runs here: the consumers' reports are written as a worker writes them."""
    from mlfarm.broker.celery_app import TRAIN_TASK, make_celery
    from mlfarm.broker.dispatch import enqueue
    from mlfarm.broker.jobs import JobSpec
    from mlfarm.broker.liveness import HOLD_MARGIN, holdings, mark_holding
    from mlfarm.broker.reconcile import UNACKED_INDEX, find_lost

    client = farm.farm()
    r, store = client.redis, client.store
    app = make_celery(farm.settings(), farm.url)
    spec = JobSpec(model="passthrough", input="/s/p.####.exr", output=str(farm.storage / "o.####.exr"),
                   frames=[1, 2, 3, 4], chunk=2, queue="cpu")
    store.create(spec, unsent=False)
    enqueue(app, farm.settings(), spec, spec.frames)
    message = take_without_acknowledging(app, "cpu")
    task_id = message.headers["id"]
    taken_at = r.zscore(UNACKED_INDEX, message.delivery_tag)
    assert taken_at is not None and time.time() - taken_at < 5
    time.sleep(0.3)

    assert find_lost(r, store, grace=0.1) == {}  # without the reports, every taken message counts
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {spec.id: [1, 2]}  # no living worker
    mark_holding(r, "w1@a", [task_id], 30)
    mark_holding(r, "w2@b", [], 30)
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {}  # w1 holds it
    mark_holding(r, "w1@a", ["some-other-task"], 30, at=taken_at + HOLD_MARGIN / 2)
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {}  # too soon after it to tell
    mark_holding(r, "w1@a", ["some-other-task"], 30, at=taken_at + HOLD_MARGIN + 1)
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {}  # w2's report is still older
    mark_holding(r, "w2@b", [], 30, at=taken_at + HOLD_MARGIN + 1)
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {spec.id: [1, 2]}
    assert find_lost(r, store, grace=60, holders=holdings(r)) == {}  # too young to call lost
    # A frame a worker started is the dead-worker sweep's to take (it marks it interrupted).
    store.start_frames(spec.id, [1], "w3@c")
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {spec.id: [2]}

    # A training run's message likewise: taken and dropped, its epochs wait for nobody.
    train = JobSpec(model="grade", input="", output="", frames=[1, 2, 3], kind="train", queue="train")
    store.create(train, unsent=False)
    app.send_task(TRAIN_TASK, kwargs={"job_id": train.id}, queue="train")
    taken = take_without_acknowledging(app, "train")
    time.sleep(0.3)
    assert train.id not in find_lost(r, store, grace=0.1)
    taken_at = r.zscore(UNACKED_INDEX, taken.delivery_tag)
    mark_holding(r, "w1@a", [task_id], 30, at=taken_at + HOLD_MARGIN + 1)
    mark_holding(r, "w2@b", [taken.headers["id"]], 30, at=taken_at + HOLD_MARGIN + 1)
    assert train.id not in find_lost(r, store, grace=0.1, holders=holdings(r))  # w2 holds it
    mark_holding(r, "w2@b", [], 30, at=taken_at + HOLD_MARGIN + 1)
    assert find_lost(r, store, grace=0.1, holders=holdings(r)) == {train.id: [1, 2, 3]}  # w1 holds the chunk


def test_a_killed_workers_taken_but_unstarted_chunk_is_queued_again_within_seconds(farm):
    """A chunk waiting its turn in a worker (another job's chunk is running) has frames still
    queued and a message only that worker held. Killed outright, the worker takes it along: kombu
    would hand it out again after MLFARM_VISIBILITY_TIMEOUT (an hour). The reconciler sees that no
    living worker holds it."""
    farm.env_overrides.update({"MLFARM_WORKER_DEAD_AFTER": "4", "MLFARM_RECONCILE_GRACE": "1",
                               "MLFARM_RECONCILE_INTERVAL": "2",
                               "MLFARM_WORKER_THREADS": "3"})  # takes a chunk while one runs (a GPU worker's way)

    client = farm.farm()
    plate = make_plate(farm.storage / "plate", [1, 2])
    victim = farm.start_worker(name="victim@faults")
    slow = client.submit("slow", plate, str(farm.storage / "slow" / "o.####.exr"), [1], {"seconds": 10})
    victim.wait_log(f"job {slow.id} slow: frames 1")
    waiting = client.submit("passthrough", plate, str(farm.storage / "waiting" / "o.####.exr"), [1, 2], chunk=2)
    wait_until_taken(client.redis, waiting.id)
    assert all(f.state == "queued" for f in client.status(waiting.id).frames)  # waiting its turn
    victim.kill()
    rescuer = farm.start_worker(name="rescuer@faults")
    status = farm.wait_job(waiting.id, timeout=60)
    assert status.state == "done", status.summary()
    rescuer.wait_log(f"job {waiting.id}: frames 1,2 had no chunk message that a living worker holds")
    assert all(f.attempts == 1 for f in status.frames)
    assert farm.wait_job(slow.id, timeout=90).state == "done"  # the dead worker's running frame too


def test_a_frame_stuck_past_its_time_limit_fails_with_the_reason_and_its_worker_restarts(farm):
    """Celery's threads and solo pools never stop a task: a frame stuck for good in a model would
    hold its worker for ever. The watchdog fails it with the reason, the rest of the job goes on
    (after the worker ends itself and is restarted, as a supervisor or compose would), the broker's
    redelivery of the stuck chunk does not run the frame again, and a retry does."""
    from mlfarm.worker.watchdog import EXIT_HUNG

    farm.env_overrides.update({"MLFARM_FRAME_TIME_LIMIT": "2", "MLFARM_CHUNK_SLACK": "2",
                               "MLFARM_VISIBILITY_TIMEOUT": "8", "MLFARM_RESTORE_INTERVAL": "1",
                               "MLFARM_WORKER_THREADS": "3"})  # the threads pool, a GPU worker's (worker/sizing.py)
    frames = list(range(1, 7))
    make_plate(farm.storage / "plate", frames)
    write_exr(farm.storage / "plate" / "plate.0002.exr", np.full((48, 64, 4), 9.0, np.float32))
    plate = str(farm.storage / "plate" / "plate.####.exr")
    out = str(farm.storage / "out" / "o.####.exr")
    first = farm.start_worker(name="h1@faults")
    client = farm.farm()
    spec = client.submit("hang", plate, out, frames, chunk=2)
    ended: list[int] = []
    deadline = time.monotonic() + 90
    while not client.status(spec.id).finished:
        assert time.monotonic() < deadline, client.status(spec.id).summary()
        for w in list(farm.workers):
            if w.proc.poll() is not None:
                ended.append(w.proc.returncode)
                farm.workers.remove(w)
        if not farm.workers:  # like a supervisor or compose restarting a dead container
            farm.start_worker(name=f"h{len(ended) + 1}@faults", wait=False)
        time.sleep(0.2)
    # Where the other chunks finish before frame 2 is found stuck (a fast machine), the job can end
    # before its worker does.
    first.proc.wait(timeout=30)
    status = client.status(spec.id)
    assert first.proc.returncode == EXIT_HUNG and ended in ([], [EXIT_HUNG]), (ended, first.log()[-2000:])
    assert status.completed == 5 and status.counts["failed"] == 1, status.summary()
    (stuck,) = status.failed_frames
    assert stuck.frame == 2 and stuck.attempts == 1
    assert stuck.reason == ("frame 2: model hang took longer than its time limit of 2s (MLFARM_FRAME_TIME_LIMIT); "
                            "the worker restarted to free the stuck thread"), stuck.reason
    assert "is past its time limit" in first.log()
    assert_outputs_whole(out, [1, 3, 4, 5, 6])
    # It stopped taking tasks before sending any back: else it fetches each one straight back, in
    # a loop until it ends (thousands a second), and a message in that loop at the exit is lost.
    assert "takes no more tasks" in first.log()
    assert first.log().count("] received") == 3, first.log()[-3000:]

    # The stuck chunk was never acknowledged: the broker delivers it again once its visibility
    # timeout has passed. That delivery must not take down the new worker on the same frame.
    (second,) = [w for w in farm.workers if w.proc.poll() is None] or [farm.start_worker(name="h2@faults")]
    second.wait_log("stuck past its time limit before", timeout=60)
    status = client.status(spec.id)
    assert [(f.frame, f.attempts, f.reason) for f in status.failed_frames] == [(2, 1, stuck.reason)]
    assert second.proc.poll() is None

    # Fixed and retried, it renders (the record's stuck mark goes with the retry).
    make_plate(farm.storage / "plate", [2])
    assert client.retry(spec.id, failed_only=True) == [2]
    status = farm.wait_job(spec.id, timeout=60)
    assert status.state == "done" and {f.frame: f.attempts for f in status.frames}[2] == 2, status.summary()


def test_only_frames_of_workers_whose_heartbeat_is_gone_count_as_orphaned(farm):
    """A frame long in a living worker's hands is not taken from it; a dead worker's frames are,
    once, and only while that worker still holds them."""
    from mlfarm.broker.jobs import JobSpec
    from mlfarm.broker.liveness import mark_alive
    from mlfarm.broker.reconcile import find_orphans

    client = farm.farm()
    store, r = client.store, client.redis
    spec = JobSpec(model="passthrough", input="/s/p.####.exr", output=str(farm.storage / "o.####.exr"),
                   frames=list(range(1, 7)), chunk=2, queue="cpu")
    store.create(spec, unsent=False)
    store.start_frames(spec.id, [1, 2], "alive@a:1")
    store.start_frames(spec.id, [3, 4], "dead@b:2")
    store.finish_frame(spec.id, 4, "done", worker="dead@b:2")
    mark_alive(r, "alive@a:1", 30)
    time.sleep(1.1)
    assert find_orphans(r, store, dead_after=60) == {}  # started too recently to tell
    assert find_orphans(r, store, dead_after=1) == {(spec.id, "dead@b:2"): [3]}

    store.start_frames(spec.id, [3], "alive@a:1")  # the broker redelivered it meanwhile
    assert store.reclaim(spec.id, [3], dead_worker="dead@b:2") == []
    assert find_orphans(r, store, dead_after=1) == {}

    store.start_frames(spec.id, [5], "dead@b:2")
    assert store.interrupted(spec.id, [5, 6]) == [5]
    assert store.reclaim(spec.id, [5], dead_worker="dead@b:2") == [5]
    assert store.frame_records(spec.id)[5]["s"] == "queued"
    assert store.interrupted(spec.id, [5, 6]) == [5]  # still a suspect: its chunk runs alone
    # The dead worker's own message, redelivered an hour later, is stale: the frame went out again
    # in a new generation of the job, whose message runs it.
    assert store.start_frames(spec.id, [5], "late@c:3") == {5: "stale"}
    assert store.start_frames(spec.id, [5], "alive@a:1", generation=1) == {5: "run"}
    store.finish_frame(spec.id, 5, "done", worker="alive@a:1")
    assert store.interrupted(spec.id, [5]) == []
