"""The frame cache, with real workers: a frame whose exact result is on the storage is not rendered.

The ``tally`` test model appends the first pixel of every frame it renders to a log file, so each
test knows exactly which frames ran through the model; the ``counter`` sequence model logs each
step as ``direction frame``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest

from mlfarm.exr.io import read_image, sidecar_path
from mlfarm.frames import frame_path

from conftest import make_plate, sample_pixels, write_exr

FRAMES = [1, 2, 3, 4, 5, 6]


def rendered(log: Path, frames_by_pixel: dict[str, int]) -> list[int]:
    """The frames the tally model rendered, from its log (one line per frame rendered)."""
    if not log.exists():
        return []
    return sorted(frames_by_pixel[line] for line in log.read_text().split())


def first_pixels(frames: list[int], seed_offset: int = 0) -> dict[str, int]:
    return {f"{float(sample_pixels(f + seed_offset)[0, 0, 0]):.6f}": f for f in frames}


@pytest.fixture
def shot(farm):
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", FRAMES)
    log = farm.storage / "tally.log"
    return farm, plate, log


def submit(farm, plate: str, out: str, log: Path, **kw):
    options = {"gain": 2.0, "log": str(log), **kw.pop("options", {})}
    spec = farm.farm().submit("tally", plate, out, kw.pop("frames", FRAMES), options, chunk=2, **kw)
    return farm.wait_job(spec.id)


def test_a_resubmitted_job_renders_nothing_and_every_frame_is_cached(shot):
    farm, plate, log = shot
    out = str(farm.storage / "out" / "t.####.exr")
    first = submit(farm, plate, out, log)
    assert first.state == "done" and first.counts["done"] == 6 and first.counts["cached"] == 0
    assert rendered(log, first_pixels(FRAMES)) == FRAMES
    stamps = {f: os.stat(frame_path(out, f)).st_mtime_ns for f in FRAMES}
    log.unlink()

    again = submit(farm, plate, out, log)
    assert again.state == "done", again.summary()
    assert again.counts["cached"] == 6 and again.counts["done"] == 0, again.counts
    assert all(f.cached for f in again.frames)
    assert "6 cached" in again.summary()
    assert not log.exists()  # the model ran 0 times
    assert {f: os.stat(frame_path(out, f)).st_mtime_ns for f in FRAMES} == stamps  # nothing rewritten
    listed = json.loads(farm.cli("status", again.spec.id, "--json", check=True).stdout)
    assert listed["counts"]["cached"] == 6 and listed["counts"]["done"] == 0
    key = oiio.ImageInput.open(frame_path(out, 3)).spec().getattribute("mlfarm/key")
    assert isinstance(key, str) and len(key) == 32


def test_another_option_renders_every_frame_and_force_renders_anyway(shot):
    farm, plate, log = shot
    out = str(farm.storage / "out" / "t.####.exr")
    submit(farm, plate, out, log)
    log.unlink()
    changed = submit(farm, plate, out, log, options={"gain": 3.0})
    assert changed.counts["done"] == 6 and changed.counts["cached"] == 0
    assert rendered(log, first_pixels(FRAMES)) == FRAMES
    np.testing.assert_allclose(read_image(frame_path(out, 2)).pixels, sample_pixels(2) * 3.0, rtol=2e-3)
    log.unlink()
    forced = submit(farm, plate, out, log, options={"gain": 3.0}, force=True)
    assert forced.counts["done"] == 6 and forced.counts["cached"] == 0
    assert rendered(log, first_pixels(FRAMES)) == FRAMES
    log.unlink()
    assert submit(farm, plate, out, log, options={"gain": 3.0}).counts["cached"] == 6  # forced ones count too
    assert not log.exists()


def test_a_redelivered_frame_renders_alone_and_a_truncated_output_renders_again(shot):
    farm, plate, log = shot
    out = str(farm.storage / "out" / "t.####.exr")
    submit(farm, plate, out, log)
    log.unlink()
    # Frame 4 re-delivered with other pixels under the same name; frame 2's output cut short.
    write_exr(farm.storage / "plate" / "plate.0004.exr", sample_pixels(104))
    path2 = frame_path(out, 2)
    size = os.path.getsize(path2)
    with open(path2, "r+b") as fh:
        fh.truncate(size // 2)
    status = submit(farm, plate, out, log)
    assert status.state == "done", status.summary()
    assert status.counts["done"] == 2 and status.counts["cached"] == 4, status.counts
    assert sorted(f.frame for f in status.frames if not f.cached) == [2, 4]
    pixels = {**first_pixels(FRAMES), **first_pixels([4], seed_offset=100)}
    assert rendered(log, pixels) == [2, 4]
    np.testing.assert_allclose(read_image(frame_path(out, 4)).pixels, sample_pixels(104) * 2.0, rtol=2e-3)
    assert os.path.getsize(path2) == size


def test_a_result_elsewhere_is_linked_into_place_complete_and_byte_identical(shot):
    farm, plate, log = shot
    first_out = str(farm.storage / "v001" / "t.####.exr")
    submit(farm, plate, first_out, log)
    log.unlink()
    # Frame 5 of the first output deleted: the index points at nothing there, so it renders.
    os.unlink(frame_path(first_out, 5))
    second_out = str(farm.storage / "v002" / "t.####.exr")
    status = submit(farm, plate, second_out, log)
    assert status.counts["cached"] == 5 and status.counts["done"] == 1, status.counts
    assert rendered(log, first_pixels(FRAMES)) == [5]
    for f in FRAMES:
        if f == 5:
            continue
        a, b = Path(frame_path(first_out, f)), Path(frame_path(second_out, f))
        assert a.read_bytes() == b.read_bytes()
        assert Path(sidecar_path(str(b))).read_text() == Path(sidecar_path(str(a))).read_text()
        np.testing.assert_allclose(read_image(str(b)).pixels, sample_pixels(f) * 2.0, rtol=2e-3)
    assert not [p for p in Path(second_out).parent.iterdir() if ".partial" in p.name]


def test_a_correction_re_tracks_a_sequence_from_its_frame_on(farm):
    """A shot propagated forward from frame 1; the same shot resubmitted with a correction on frame 4
    re-runs the sequence model on frames 4-6 only, resumed from frame 3's written state, and ends
    with exactly the planes a fresh render with the correction gives."""
    from mlfarm.prompts import parse_inline

    farm.start_worker()
    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames)
    log = farm.storage / "steps.log"
    client = farm.farm()
    out = str(farm.storage / "seq" / "s.####.exr")
    once = parse_inline(["1:car:box=1,1,20,20"])
    corrected = parse_inline(["1:car:box=1,1,20,20", "4:car:box=2,2,30,30"])
    first = farm.wait_job(client.submit("counter", plate, out, frames, {"log": str(log)}, prompts=once).id)
    assert first.state == "done" and first.counts["done"] == 6, first.summary()
    log.unlink()
    again = farm.wait_job(client.submit("counter", plate, out, frames, {"log": str(log)}, prompts=once).id)
    assert again.counts["cached"] == 6 and not log.exists(), again.summary()

    fixed = farm.wait_job(client.submit("counter", plate, out, frames, {"log": str(log)}, prompts=corrected).id)
    assert fixed.state == "done", fixed.summary()
    assert sorted(f.frame for f in fixed.frames if f.cached) == [1, 2, 3]
    assert log.read_text().split("\n")[:-1] == ["forward 4", "forward 5", "forward 6"]
    fresh_out = str(farm.storage / "fresh" / "s.####.exr")
    fresh = farm.wait_job(client.submit("counter", plate, fresh_out, frames, {"log": str(log)}, prompts=corrected,
                                        force=True).id)
    assert fresh.counts["done"] == 6
    for f in frames:
        ours, theirs = read_image(frame_path(out, f)), read_image(frame_path(fresh_out, f))
        state = ours.channels.index("state.V")
        np.testing.assert_array_equal(ours.pixels[..., state], theirs.pixels[..., theirs.channels.index("state.V")])
