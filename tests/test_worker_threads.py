"""Chunks side by side in one worker process (Settings.worker_threads), with a real worker.

One-frame chunks of a job overlap, so a model's lanes stay busy across chunk boundaries; chunks of
another job that sets the model differently run beside them, each with its own options; the lanes
still cap how many batches the model sees at once.
"""

from __future__ import annotations

import json

import OpenImageIO as oiio
import pytest

from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path

from conftest import make_plate


def overlap(path: str) -> int:
    image = read_image(path)
    return int(image.pixels[0, 0, list(image.channels).index("overlap.n")])


def seconds(path: str) -> float:
    """The ``seconds`` option the frame was rendered with (the model reports it per frame)."""
    objects = json.loads(oiio.ImageInput.open(path).spec().getattribute("mlfarm/objects"))
    return objects[0]["seconds"]


@pytest.mark.parametrize("threads", [1, 2])
def test_one_frame_chunks_of_differently_set_jobs_overlap_each_with_its_own_options(farm, threads):
    farm.env_overrides["MLFARM_WORKER_THREADS"] = str(threads)
    farm.start_worker()
    frames = [1, 2, 3, 4]
    plate = make_plate(farm.storage / "plate", frames)
    client = farm.farm()
    out_a, out_b = (str(farm.storage / name / "o.####.exr") for name in ("a", "b"))
    # Job a has three chunks: with two threads its last one runs beside job b's first.
    a = client.submit("lanes", plate, out_a, frames[:3], {"lanes": 2, "seconds": 0.5}, chunk=1)
    b = client.submit("lanes", plate, out_b, frames, {"lanes": 2, "seconds": 0.4}, chunk=1)
    status_a, status_b = farm.wait_job(a.id), farm.wait_job(b.id)
    assert status_a.counts["done"] == 3 and status_b.counts["done"] == 4, (status_a.summary(), status_b.summary())
    # One batch a chunk: two in the model at once only if two chunks ran side by side.
    assert max(overlap(frame_path(out_b, f)) for f in frames) == threads
    # Options travel with each chunk: every frame was rendered with its own job's.
    assert {seconds(frame_path(out_a, f)) for f in frames[:3]} == {0.5}
    assert {seconds(frame_path(out_b, f)) for f in frames} == {0.4}
    if threads == 2:  # job b sets the model differently and still did not wait for job a to end
        assert min(f.started for f in status_b.frames) < max(f.ended for f in status_a.frames)


def test_chunks_side_by_side_share_the_lanes(farm):
    """Three chunks of three frames, two at a time: never more batches in the model than lanes=1."""
    farm.env_overrides["MLFARM_WORKER_THREADS"] = "3"  # a GPU worker's way; a CPU worker's plan takes one
    farm.start_worker()
    frames = list(range(1, 10))
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    spec = farm.farm().submit("lanes", plate, out, frames, {"lanes": 1, "seconds": 0.2}, chunk=3)
    status = farm.wait_job(spec.id)
    assert status.counts["done"] == 9, status.summary()
    starts = sorted(f.started for f in status.frames)
    assert starts[3] < max(f.ended for f in status.frames[:3])  # a second chunk started during the first
    assert {overlap(frame_path(out, f)) for f in frames} == {1}
