"""Jobs on a real farm: bad frames fail alone, retry, cancel, refusals, storage confinement."""

from __future__ import annotations

import json
import os

import numpy as np
import OpenImageIO as oiio
import pytest
import redis

from mlfarm.client import SubmitError
from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path
from mlfarm.models.options import OptionError

from conftest import make_plate, sample_pixels


def corrupt(path: str) -> None:
    """Keep the EXR header, cut the pixel data: OpenEXR reports missing chunks."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_missing_and_corrupt_frames_fail_alone_and_retry_reruns_only_them(farm):
    farm.start_worker()
    frames = list(range(1, 9))
    plate = make_plate(farm.storage / "plate", frames)
    os.remove(frame_path(plate, 3))
    corrupt(frame_path(plate, 6))
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("passthrough", plate, out, frames, chunk=4)
    status = farm.wait_job(spec.id)

    assert status.state == "failed"
    assert status.counts == {"queued": 0, "running": 0, "done": 6, "failed": 2, "cancelled": 0, "cached": 0,
                             "waiting": 0, "held": 0}
    reasons = {f.frame: f.reason for f in status.failed_frames}
    assert set(reasons) == {3, 6}
    assert reasons[3] == f"frame 3: {frame_path(plate, 3)}: file not found"
    assert reasons[6].startswith(f"frame 6: {frame_path(plate, 6)}: ")
    assert reasons[6].endswith("some scanline chunks were missing or corrupted")
    for f in frames:
        assert os.path.exists(frame_path(out, f)) == (f not in (3, 6))
    done_mtimes = {f: os.stat(frame_path(out, f)).st_mtime_ns for f in frames if f not in (3, 6)}

    # Fix the plate, retry only the failed frames.
    make_plate(farm.storage / "plate", [3, 6])
    requeued = client.retry(spec.id, failed_only=True)
    assert requeued == [3, 6]
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()
    assert {f.frame: f.attempts for f in status.frames if f.frame in (3, 6)} == {3: 2, 6: 2}
    assert all(f.attempts == 1 for f in status.frames if f.frame not in (3, 6))
    for f, mtime in done_mtimes.items():
        assert os.stat(frame_path(out, f)).st_mtime_ns == mtime, f"frame {f} was rendered again"
    np.testing.assert_array_equal(read_image(frame_path(out, 6)).rgba(4),
                                  sample_pixels(6).astype(np.float16).astype(np.float32))


def test_a_frame_can_be_retried_more_often_than_its_attempt_cap(farm):
    """MLFARM_MAX_ATTEMPTS stops a frame from taking down worker after worker within one go; it must
    not stop an artist retrying the frame again and again, nor after fixing its input."""
    farm.env_overrides["MLFARM_MAX_ATTEMPTS"] = "2"
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [1, 2])
    os.remove(frame_path(plate, 2))
    client = farm.farm()
    spec = client.submit("passthrough", plate, str(farm.storage / "out" / "o.####.exr"), [1, 2], chunk=2)
    missing = f"frame 2: {frame_path(plate, 2)}: file not found"
    status = farm.wait_job(spec.id)
    assert [(f.frame, f.reason, f.attempts) for f in status.failed_frames] == [(2, missing, 1)]
    for attempt in (2, 3, 4):  # beyond the cap of 2: each retry is a new go, and really runs
        assert client.retry(spec.id, failed_only=True) == [2]
        status = farm.wait_job(spec.id)
        assert [(f.frame, f.reason, f.attempts) for f in status.failed_frames] == [(2, missing, attempt)]
    make_plate(farm.storage / "plate", [2])
    assert client.retry(spec.id, failed_only=True) == [2]
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()
    assert {f.frame: f.attempts for f in status.frames} == {1: 1, 2: 5}


def test_refused_submissions_queue_nothing(farm):
    plate = make_plate(farm.storage / "plate", [1])
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    before = set(client.redis.keys("*"))
    with pytest.raises(OptionError, match="model blur has no option radius"):
        client.submit("blur", plate, out, [1], {"radius": 3})
    with pytest.raises(OptionError, match="kernel_size='big' is not an int"):
        client.submit("blur", plate, out, [1], {"kernel_size": "big"})
    with pytest.raises(OptionError, match="above the maximum"):
        client.submit("blur", plate, out, [1], {"kernel_size": 1000})
    with pytest.raises(SubmitError, match="unknown model 'blurr'"):
        client.submit("blurr", plate, out, [1])
    with pytest.raises(SubmitError, match="outside the storage root"):
        client.submit("blur", plate, str(farm.root / "elsewhere" / "o.####.exr"), [1])
    with pytest.raises(SubmitError, match="outside the storage root"):
        client.submit("blur", plate, str(farm.storage / ".." / "o.####.exr"), [1])
    with pytest.raises(SubmitError, match="overwrite the input"):
        client.submit("blur", plate, plate, [1])
    with pytest.raises(SubmitError, match="no frame number"):
        client.submit("blur", plate, str(farm.storage / "o.exr"), [1])
    with pytest.raises(SubmitError, match="redelivery timeout"):
        client.submit("blur", plate, out, [1], chunk=10_000)
    assert set(client.redis.keys("*")) == before


def test_worker_refuses_outputs_that_escape_through_a_symlink(farm):
    """The submit-time check sees a path under the root; the worker resolves the symlink and refuses."""
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [1, 2])
    outside = farm.root / "outside"
    outside.mkdir()
    (farm.storage / "link").symlink_to(outside)
    client = farm.farm()
    # Bypass the client's own check, as a hand-crafted job record would.
    client.check_output = lambda pattern: None
    spec = client.submit("passthrough", plate, str(farm.storage / "link" / "o.####.exr"), [1, 2])
    status = farm.wait_job(spec.id)
    assert status.state == "failed"
    assert all("outside the storage root" in f.reason for f in status.failed_frames)
    assert list(outside.iterdir()) == []


def test_cancel_drops_queued_frames_and_retry_brings_them_back(farm):
    plate = make_plate(farm.storage / "plate", range(1, 13))
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("slow", plate, out, list(range(1, 13)), {"seconds": 0.3}, chunk=2)
    assert client.cancel(spec.id) == 12  # no worker yet: every frame was still queued
    worker = farm.start_worker()
    status = farm.wait_job(spec.id)
    assert status.state == "cancelled" and status.counts["cancelled"] == 12
    worker.wait_log("0 failed, 0 skipped, 2 cancelled")
    assert not (farm.storage / "out").exists()
    assert client.retry(spec.id) == list(range(1, 13))
    status = farm.wait_job(spec.id)
    assert status.state == "done" and status.counts["done"] == 12


def test_data_planes_objects_and_metadata(farm):
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [5])
    out = str(farm.storage / "out" / "o.%04d.exr")
    spec = farm.farm().submit("slow", plate, out, [5], {"seconds": 0, "mode": "invert", "label": "héllo"})
    assert farm.wait_job(spec.id).state == "done"
    inp = oiio.ImageInput.open(frame_path(out, 5))
    header = inp.spec()
    inp.close()
    assert sorted(header.channelnames) == ["A", "B", "G", "R", "extra.id"]
    formats = dict(zip(header.channelnames, [str(f) for f in header.channelformats]))
    assert formats == {"R": "half", "G": "half", "B": "half", "A": "half", "extra.id": "float"}
    assert json.loads(header.getattribute("mlfarm/objects")) == [{"label": "héllo"}]
    assert json.loads(header.getattribute("mlfarm/options")) == {
        "seconds": 0.0, "gain": 1.0, "mode": "invert", "label": "héllo", "flag": False}
    image = read_image(frame_path(out, 5))
    assert np.all(image.pixels[:, :, image.channels.index("extra.id")] == 7.0)
    expected = (1.0 - sample_pixels(5)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(image.rgba(4), expected)


def test_a_pickled_message_is_refused_and_not_executed(farm):
    """Someone with queue access injects a pickle-serialised chunk: the worker must not run it."""
    from mlfarm.broker.celery_app import CHUNK_TASK, make_celery
    from mlfarm.broker.jobs import JobSpec

    worker = farm.start_worker()
    client = farm.farm()
    plate = make_plate(farm.storage / "plate", [1])
    out = str(farm.storage / "out" / "o.####.exr")
    spec = JobSpec(model="passthrough", input=plate, output=out, frames=[1], queue="cpu")
    client.store.create(spec, unsent=False)
    app = make_celery(farm.settings(), farm.url)
    assert app.conf.accept_content == ["json"] and app.conf.result_accept_content == ["json"]
    app.send_task(CHUNK_TASK, kwargs={"job_id": spec.id, "model": "passthrough", "frames": "1"},
                  queue="cpu", serializer="pickle")
    worker.wait_log("ContentDisallowed")
    # The same request in JSON is executed: proof the worker was listening all along.
    app.send_task(CHUNK_TASK, kwargs={"job_id": spec.id, "model": "passthrough", "frames": "1"}, queue="cpu")
    assert farm.wait_job(spec.id).state == "done"
    assert worker.log().count(f"job {spec.id} passthrough: frames 1") == 1
    assert redis.Redis.from_url(farm.url).ping()


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    from mlfarm.storage import HOST, atomic_output, remove_stale_partials

    dead = tmp_path / f".o.0001.exr.partial-{HOST}-999999999-abcd"
    alive = tmp_path / f".o.0001.exr.partial-{HOST}-{os.getpid()}-abcd"
    other = tmp_path / ".o.0002.exr.partial-otherhost-1-abcd"
    old = tmp_path / ".o.0003.exr.partial-otherhost-1-abcd"
    for p in (dead, alive, other, old):
        p.write_bytes(b"half")
    os.utime(old, (0, 0))
    assert remove_stale_partials(tmp_path) == 2
    assert not dead.exists() and not old.exists() and alive.exists() and other.exists()
    with atomic_output(tmp_path / "o.0001.exr", tmp_path) as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "o.0001.exr").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "o.0001.exr"])


def test_a_new_chunk_cleans_up_after_a_dead_writer(farm):
    from mlfarm.storage import HOST

    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [1])
    (farm.storage / "out").mkdir()
    leftover = farm.storage / "out" / f".o.0001.exr.partial-{HOST}-999999999-dead"
    leftover.write_bytes(b"half an exr")
    spec = farm.farm().submit("passthrough", plate, str(farm.storage / "out" / "o.####.exr"), [1])
    assert farm.wait_job(spec.id).state == "done"
    assert sorted(p.name for p in (farm.storage / "out").iterdir()) == ["o.0001.exr"]
