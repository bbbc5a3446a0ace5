"""SAM 2, Depth Anything and RAFT end to end through a real worker, on tiny random models saved to the
weights folder and loaded through the plugins' real loading code (CPU, small frames)."""

from __future__ import annotations

import json

import numpy as np
import OpenImageIO as oiio
import pytest

from mlfarm.exr.io import read_image, sidecar_path
from mlfarm.frames import frame_path
from mlfarm.prompts import parse_inline

from conftest import make_plate, write_exr
from tiny_models import depth_anything, sam2_video


def moving_square_plate(folder, frames, w=64, h=48):
    """A scene-linear plate with a bright square moving 3 px right and 2 px down per frame."""
    for i, f in enumerate(frames):
        img = np.full((h, w, 4), 0.05, np.float32)
        img[..., 3] = 1
        img[6 + 2 * i:18 + 2 * i, 8 + 3 * i:22 + 3 * i, :3] = 0.9
        write_exr(folder / f"plate.{f:04d}.exr", img)
    return str(folder / "plate.####.exr")


def header(path: str) -> dict:
    inp = oiio.ImageInput.open(path)
    try:
        return {a.name: a.value for a in inp.spec().extra_attribs}
    finally:
        inp.close()


@pytest.fixture
def weights(farm):
    folder = farm.root / "weights"
    folder.mkdir()
    farm.env_overrides["MLFARM_WEIGHTS_DIR"] = str(folder)
    return folder


def test_sam2_segments_a_shot_from_one_prompt_with_stable_ids_and_planes_nuke_uses(farm, weights):
    sam2_video(weights / "sam2.1-hiera-tiny")
    farm.start_worker()
    frames = list(range(1001, 1007))
    plate = moving_square_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "seg.####.exr")
    client = farm.farm()
    prompts = parse_inline(["1002:car:box=8,6,22,18:pos=15,12", "1002:sign:pos=50,40"])
    spec = client.submit("sam2", plate, out, frames, {"size": "tiny"}, prompts=prompts)
    status = farm.wait_job(spec.id, timeout=240)
    assert status.state == "done", status.summary() + "\n" + farm.workers[0].log()[-3000:]

    for f in frames:  # forward from 1002 and backward to 1001
        image = read_image(frame_path(out, f))
        assert {"R", "G", "B", "A", "matte.A", "instance.id", "car.A", "sign.A"} <= set(image.channels)
        px = {c: image.pixels[..., i] for i, c in enumerate(image.channels)}
        assert set(np.unique(px["instance.id"])) <= {0.0, 1.0, 2.0}
        np.testing.assert_array_equal(px["matte.A"], (px["instance.id"] > 0).astype(np.float32))
        for name, oid in (("car.A", 1.0), ("sign.A", 2.0)):  # an object's own matte holds its id's pixels
            assert (px[name][px["instance.id"] == oid] == 1).all()
        side = json.loads(open(sidecar_path(frame_path(out, f))).read())
        assert [(o["id"], o["name"]) for o in side["objects"]] == [(1, "car"), (2, "sign")]  # absent ones listed
        assert all(o["present"] == (o["pixels"] > 0) for o in side["objects"])
        assert header(frame_path(out, f))["mlfarm/model"] == "sam2"

    refused = client.describe("sam2")
    assert refused["temporal"] == "sequence" and refused["promptable"] is True
    from mlfarm.client import SubmitError

    with pytest.raises(SubmitError, match="no SAM 2.1 base-plus weights: looked for .*mlfarm models fetch sam2"):
        client.submit("sam2", plate, out, frames, prompts=prompts)  # the default size, whose weights are not here


def test_depth_writes_depth_z_and_says_what_it_holds(farm, weights):
    depth_anything(weights / "depth-anything-v2-small")
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [1, 2, 3])
    out = str(farm.storage / "out" / "d.####.exr")
    spec = farm.farm().submit("depth", plate, out, [1, 2, 3], {"mode": "depth"})
    status = farm.wait_job(spec.id, timeout=180)
    assert status.state == "done", status.summary()
    image = read_image(frame_path(out, 2))
    assert image.channels[:4] == ["R", "G", "B", "A"] and "depth.Z" in image.channels
    z = image.pixels[..., image.channels.index("depth.Z")]
    assert z.shape == (48, 64) and np.isfinite(z).all() and (z > 0).all()
    meta = header(frame_path(out, 2))
    assert meta["mlfarm/depth.Z"].startswith("1/max(inverse depth, 1e-6)") and "ZDefocus math: depth" in meta[
        "mlfarm/depth.Z"]


def test_raft_flow_runs_through_a_worker_with_random_weights_from_a_file(farm, weights):
    import torch
    import torchvision.models.optical_flow as flow

    from mlfarm.models.builtin.flow.weights import ARCHITECTURES

    torch.manual_seed(0)
    torch.save(flow.raft_small(weights=None).state_dict(), weights / ARCHITECTURES["raft_small"][0])
    farm.start_worker()
    frames = [1, 2, 3]
    plate = moving_square_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "f.####.exr")
    spec = farm.farm().submit("flow", plate, out, frames, {"arch": "raft_small", "updates": 2}, chunk=2)
    status = farm.wait_job(spec.id, timeout=180)
    assert status.state == "done", status.summary()
    for f in frames:
        image = read_image(frame_path(out, f))
        assert set(image.channels) == {"R", "G", "B", "A", "backward.u", "backward.v", "forward.u", "forward.v"}
        assert np.isfinite(image.pixels).all()

    def plane(f, *names):
        image = read_image(frame_path(out, f))
        return image.pixels[..., [image.channels.index(n) for n in names]]

    assert (plane(1, "backward.u", "backward.v") == 0).all()  # no previous frame: zeros
    assert (plane(3, "forward.u", "forward.v") == 0).all()  # no next frame
    assert (plane(2, "forward.u", "forward.v") != 0).any()
    notes = json.loads(open(sidecar_path(frame_path(out, 1))).read())["objects"][0]
    assert notes["backward"] == "zeros: no previous frame" and notes["next"] == 2
    assert "u right, v up" in header(frame_path(out, 2))["mlfarm/flow"]
