"""Worker behaviour beyond the basic path: input formats, prefork children, GPU pinning, the model
cache, settings from a config file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import OpenImageIO as oiio
import pytest

from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path
from mlfarm.models.catalog import Catalog, discover
from mlfarm.settings import Settings
from mlfarm.worker.model_cache import ModelCache

from conftest import PLUGINS, make_plate


def write_8bit(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, c = pixels.shape
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), oiio.ImageSpec(w, h, c, oiio.UINT8)), oiio.geterror()
    out.write_image(pixels)
    out.close()


@pytest.mark.parametrize("ext", ["png", "tif", "dpx"])
def test_non_exr_inputs_are_read_through_openimageio(farm, ext):
    farm.start_worker()
    rng = np.random.default_rng(5)
    frames = [7, 8]
    originals = {f: rng.integers(0, 256, (24, 40, 3), dtype=np.uint8) for f in frames}
    for f, px in originals.items():
        write_8bit(farm.storage / "plate" / f"p.{f:04d}.{ext}", px)
    out = str(farm.storage / "out" / "o.####.exr")
    spec = farm.farm().submit("passthrough", str(farm.storage / "plate" / f"p.%04d.{ext}"), out, frames)
    assert farm.wait_job(spec.id).state == "done"
    for f, px in originals.items():
        got = read_image(frame_path(out, f)).rgba(4)
        assert got.shape == (24, 40, 3)
        np.testing.assert_allclose(got, px.astype(np.float32) / 255, atol=1e-3)


def test_prefork_children_render_frames(farm):
    worker = farm.start_worker(concurrency=2)
    plate = make_plate(farm.storage / "plate", range(1, 9))
    spec = farm.farm().submit("passthrough", plate, str(farm.storage / "out" / "o.####.exr"), list(range(1, 9)),
                              chunk=1)
    status = farm.wait_job(spec.id)
    assert status.state == "done"
    pids = {f.worker.rsplit(":", 1)[1] for f in status.frames}
    assert pids and str(worker.proc.pid) not in pids  # frames ran in the forked children, not the parent


def test_gpu_option_pins_the_worker_before_anything_loads(farm):
    proc = subprocess.Popen([sys.executable, "-m", "mlfarm", "worker", "--gpu", "3", "--queues", "gpu",
                             "--name", "g3@test"], env=farm.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "g3@test ready." in line:
                break
        log = "".join(lines)
        assert "pinned to GPU 3 (CUDA_VISIBLE_DEVICES=3)" in log, log
        assert "mlfarm-gpu3" not in log  # the explicit name wins
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_model_cache_loads_once_and_evicts_the_least_recent(tmp_path):
    cache = ModelCache(Catalog(discover([PLUGINS])), size=2, device_policy="cpu")
    blur = cache.get("blur")
    assert cache.get("blur") is blur and blur.torch_device == "cpu"
    cache.get("passthrough")
    cache.get("blur")  # blur is now the most recent
    cache.get("slow")
    assert cache.warm() == ["blur", "slow"]
    assert cache.get("passthrough") is not None and cache.warm() == ["slow", "passthrough"]


def test_settings_come_from_a_toml_file_and_env_wins(tmp_path, monkeypatch):
    config = tmp_path / "mlfarm.toml"
    config.write_text('storage_root = "/mnt/shared"\ndefault_chunk = 8\nexr_compression = "piz"\n')
    monkeypatch.setenv("MLFARM_CONFIG", str(config))
    monkeypatch.setenv("MLFARM_DEFAULT_CHUNK", "2")
    for key in ("MLFARM_STORAGE_ROOT", "MLFARM_EXR_COMPRESSION"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (str(s.storage_root), s.default_chunk, s.exr_compression) == ("/mnt/shared", 2, "piz")
    with pytest.raises(ValueError, match="MLFARM_VISIBILITY_TIMEOUT"):
        Settings(visibility_timeout=100, frame_time_limit=300)


@pytest.mark.parametrize("lanes", [1, 2])
def test_a_model_with_lanes_gets_that_many_batches_at_once(farm, lanes):
    """``BaseModel.lanes``: the worker keeps that many batches in ``infer_batch`` at once (no more),
    from lane threads that outlive the chunk (GPU libraries tune per thread); a missing frame still
    fails alone and the rest are written."""
    farm.start_worker()
    frames = list(range(1, 10))
    plate = make_plate(farm.storage / "plate", [f for f in frames if f != 5])
    out = str(farm.storage / "out" / "o.####.exr")
    spec = farm.farm().submit("lanes", plate, out, frames, {"lanes": lanes, "seconds": 0.4}, chunk=3)
    status = farm.wait_job(spec.id)
    assert status.counts["done"] == 8 and status.counts["failed"] == 1, status.summary()
    assert status.failed_frames[0].frame == 5
    overlaps, threads = [], set()
    for f in frames:
        if f == 5:
            continue
        image = read_image(frame_path(out, f))
        header = oiio.ImageInput.open(frame_path(out, f))
        threads.add(json.loads(header.spec().getattribute("mlfarm/objects"))[0]["thread"])
        header.close()
        overlaps.append(int(image.pixels[0, 0, list(image.channels).index("overlap.n")]))
        np.testing.assert_allclose(image.rgba(4), read_image(frame_path(plate, f)).rgba(4), rtol=2e-3)  # rgba half
    assert max(overlaps) == lanes, overlaps
    # Three chunks (two at a time), one set of threads: the same lanes every chunk.
    names = {t.split("#")[0] for t in threads}
    assert len(threads) == lanes, threads
    assert names == {f"mlfarm-lane{lanes}_{i}" for i in range(lanes)}, threads


def test_a_model_returning_torch_tensors_gets_them_written_as_planes(farm):
    """A model may hand back tensors (a GPU model leaves them on the device for GPU compression); on
    the CPU they take the OpenEXR writer, with the same types rules as numpy planes."""
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", [1, 2])
    out = str(farm.storage / "tensors" / "t.####.exr")
    spec = farm.farm().submit("tensors", plate, out, [1, 2])
    status = farm.wait_job(spec.id)
    assert status.counts["done"] == 2, status.summary()
    for f in (1, 2):
        source = read_image(frame_path(plate, f)).rgba(4)
        image = read_image(frame_path(out, f))
        np.testing.assert_allclose(image.rgba(4), source * 2, rtol=2e-3)  # rgba as half
        ids = image.pixels[:, :, list(image.channels).index("mask.id")]
        np.testing.assert_array_equal(ids, np.where(source[:, :, 0] > 0.5, 7.0, 0.0))
        header = oiio.ImageInput.open(frame_path(out, f))
        spec_ = header.spec()
        objects = json.loads(spec_.getattribute("mlfarm/objects"))
        formats = dict(zip(spec_.channelnames, (str(t) for t in spec_.channelformats or
                                                 (spec_.format,) * spec_.nchannels)))
        header.close()
        assert objects == [{"pixels_over_half": int((source[:, :, 0] > 0.5).sum())}]
        assert formats["mask.id"] == "half" and formats["R"] == "half"
