"""Models that see time, on a real farm: windows of neighbours and stateful sequences.

The test models (tests/plugins): ``neighbours`` writes the mean of frames f-1..f+1 and which frames
it averaged; ``counter`` writes its carried state (the running sum of its inputs' means, plus 1000
per prompted object id), so order, resumption and every frame's single rendering show exactly.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from mlfarm.client import SubmitError
from mlfarm.exr.io import read_image, read_planes
from mlfarm.frames import frame_path
from mlfarm.prompts import parse_inline

from conftest import make_plate, sample_pixels

HALF = dict(rtol=2e-3, atol=2e-3)  # rgba is written as half
COUNTER = {"rgba": 4, "state": ("V",), "steps": ("V",)}


def expected_states(frames: list[int], prompted: dict[int, int]) -> dict[int, float]:
    """The counter's state after each frame, stepped in this order from 0 (float32, as it keeps it)."""
    value, out = 0.0, {}
    for f in frames:
        gain = float(np.mean(sample_pixels(f)[..., :4], dtype=np.float64)) + 1000.0 * prompted.get(f, 0)
        value = float(np.float32(value + gain))
        out[f] = value
    return out


def planes(out: str, frame: int) -> dict[str, np.ndarray]:
    return read_planes(frame_path(out, frame), COUNTER)


def log_lines(path) -> list[tuple[str, int]]:
    return [(d, int(f)) for d, f in (line.split() for line in path.read_text().splitlines())]


def test_a_window_model_reads_neighbours_for_context_and_clamps_at_the_ends(farm):
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", range(1001, 1011))
    client = farm.farm()
    out = str(farm.storage / "out" / "n.####.exr")
    # Frames 1003-1008 in chunks of 2: every chunk reads its neighbours, also 1002 and 1009, not submitted.
    spec = client.submit("neighbours", plate, out, list(range(1003, 1009)), chunk=2)
    assert spec.temporal == "window"
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()
    for f in range(1003, 1009):
        image = read_image(frame_path(out, f))
        mean = (sample_pixels(f - 1) + sample_pixels(f) + sample_pixels(f + 1)) / 3
        np.testing.assert_allclose(image.rgba(4), mean, **HALF)
        assert image.pixels[0, 0, image.channels.index("sources.prev")] == f - 1
        assert image.pixels[0, 0, image.channels.index("sources.next")] == f + 1

    # The shot's ends and a hole: the nearest frame on disk stands in; the missing frame itself fails.
    os.remove(frame_path(plate, 1006))
    ends = str(farm.storage / "out" / "e.####.exr")
    spec = client.submit("neighbours", plate, ends, list(range(1001, 1011)), chunk=3)
    status = farm.wait_job(spec.id)
    assert [f.frame for f in status.failed_frames] == [1006]
    assert "1006" in status.failed_frames[0].reason and "file not found" in status.failed_frames[0].reason
    first = read_image(frame_path(ends, 1001))
    np.testing.assert_allclose(first.rgba(4), (2 * sample_pixels(1001) + sample_pixels(1002)) / 3, **HALF)
    last = read_image(frame_path(ends, 1010))
    np.testing.assert_allclose(last.rgba(4), (sample_pixels(1009) + 2 * sample_pixels(1010)) / 3, **HALF)
    before_hole = read_image(frame_path(ends, 1005))
    np.testing.assert_allclose(before_hole.rgba(4), (sample_pixels(1004) + 2 * sample_pixels(1005)) / 3, **HALF)
    assert before_hole.pixels[0, 0, before_hole.channels.index("sources.next")] == 1005


def test_a_sequence_runs_forward_and_backward_from_the_prompt_in_segments_that_resume_exactly(farm):
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", range(1001, 1011))
    client = farm.farm()
    out = str(farm.storage / "out" / "c.####.exr")
    log = farm.storage / "steps.log"
    prompts = parse_inline(["1004:car:box=1,1,20,20"])
    spec = client.submit("counter", plate, out, list(range(1001, 1011)), {"log": str(log)}, chunk=3,
                         prompts=prompts)
    assert spec.temporal == "sequence" and spec.prompts == prompts.to_json()
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()

    forward = expected_states(list(range(1004, 1011)), {1004: 1})
    backward = expected_states([1004, 1003, 1002, 1001], {1004: 1})
    for f in range(1001, 1011):
        got = planes(out, f)
        want = forward[f] if f >= 1004 else backward[f]
        assert got["state"][0, 0, 0] == np.float32(want), f
    # Forward in segments of 3: each new segment is a fresh session seeded from the frame before.
    steps = {f: int(planes(out, f)["steps"][0, 0, 0]) for f in range(1001, 1011)}
    assert [steps[f] for f in range(1004, 1011)] == [1, 2, 3, 1, 2, 3, 1]
    # Backward starts from the prompted frame (forward writes it), so 1003 is its second step.
    assert [steps[f] for f in (1003, 1002, 1001)] == [2, 3, 4]
    lines = log_lines(log)
    assert [f for d, f in lines if d == "forward"] == list(range(1004, 1011))  # each frame once, in order
    assert [f for d, f in lines if d == "backward"] == [1004, 1003, 1002, 1001]
    assert all(f.attempts == 1 for f in status.frames)


def test_a_killed_workers_sequence_resumes_on_another_worker_after_its_last_written_frame(farm):
    farm.env_overrides["MLFARM_WORKER_DEAD_AFTER"] = "4"
    victim = farm.start_worker(name="victim@test")
    frames = list(range(1001, 1021))
    plate = make_plate(farm.storage / "plate", frames)
    client = farm.farm()
    out = str(farm.storage / "out" / "k.####.exr")
    log = farm.storage / "steps.log"
    spec = client.submit("counter", plate, out, frames, {"log": str(log), "seconds": 0.3}, chunk=20,
                         prompts=parse_inline(["1001:car:box=1,1,20,20"]))
    deadline = time.monotonic() + 60
    while sum(1 for f in frames if os.path.exists(frame_path(out, f))) < 5:
        assert time.monotonic() < deadline, "the sequence did not start"
        time.sleep(0.05)
    victim.kill()
    written = [f for f in frames if os.path.exists(frame_path(out, f))]
    mtimes = {f: os.stat(frame_path(out, f)).st_mtime_ns for f in written}
    farm.start_worker(name="rescuer@test")
    status = farm.wait_job(spec.id, timeout=180)
    assert status.state == "done", status.summary()

    want = expected_states(frames, {1001: 1})
    for f in frames:
        assert planes(out, f)["state"][0, 0, 0] == np.float32(want[f]), f  # as if never interrupted
    for f, mtime in mtimes.items():
        assert os.stat(frame_path(out, f)).st_mtime_ns == mtime, f"frame {f} was written twice"
    steps = [int(planes(out, f)["steps"][0, 0, 0]) for f in frames]
    resumed = steps.index(1, 1) + frames[0]  # where the rescuer's session began
    assert resumed > written[-1] - 1 and resumed <= written[-1] + 2, (written, steps)
    stepped = [f for _, f in log_lines(log)]
    assert stepped.count(1001) == 1  # not restarted from the start
    assert sorted(set(stepped)) == frames


def test_a_sequence_can_be_cancelled_and_retried_and_refuses_bad_prompts(farm):
    farm.start_worker()
    frames = list(range(1001, 1013))
    plate = make_plate(farm.storage / "plate", frames)
    client = farm.farm()
    out = str(farm.storage / "out" / "r.####.exr")
    prompts = parse_inline(["1001:car:box=1,1,20,20"])
    spec = client.submit("counter", plate, out, frames, {"seconds": 0.25}, chunk=4, prompts=prompts)
    deadline = time.monotonic() + 60
    while not os.path.exists(frame_path(out, 1003)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.cancel(spec.id)
    status = farm.wait_job(spec.id)
    assert status.state == "cancelled" and status.counts["cancelled"] >= 4, status.summary()
    done = [f.frame for f in status.frames if f.state == "done"]
    assert done == frames[:len(done)]  # in order, from the prompt
    client.retry(spec.id)
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()
    want = expected_states(frames, {1001: 1})
    for f in frames:
        assert planes(out, f)["state"][0, 0, 0] == np.float32(want[f]), f
    assert int(planes(out, done[-1] + 1)["steps"][0, 0, 0]) == 1  # the retry resumed after the last done frame

    with pytest.raises(SubmitError, match="model counter needs prompts"):
        client.submit("counter", plate, out, frames)
    with pytest.raises(SubmitError, match="model passthrough takes no prompts"):
        client.submit("passthrough", plate, out, frames, prompts=prompts)
    with pytest.raises(SubmitError, match="frame 999 is not one of the job's frames"):
        client.submit("counter", plate, out, frames, prompts=parse_inline(["999:car:box=1,1,20,20"]))
    with pytest.raises(SubmitError, match=r"box \[1.0, 1.0, 80.0, 20.0\] is outside the 64x48 image"):
        client.submit("counter", plate, out, frames, prompts=parse_inline(["1001:car:box=1,1,80,20"]))
    # The CLI takes the same prompts inline, and says why it refuses.
    refused = farm.cli("submit", "--model", "counter", "--input", plate, "--output", out, "--frames", "1001-1003",
                       "--prompt", "1001:car:box=1,1,20")
    assert refused.returncode != 0 and "box must be [x0, y0, x1, y1]" in refused.stderr
