"""Submit -> real workers -> EXR planes on disk, checked against the model called directly."""

from __future__ import annotations

import json

import numpy as np
import OpenImageIO as oiio

from mlfarm.exr.io import read_image
from mlfarm.frames import frame_path
from mlfarm.models.catalog import Catalog, discover

from conftest import make_plate, sample_pixels


def test_blur_job_outputs_match_the_model_called_directly(farm):
    farm.start_worker()
    frames = list(range(1001, 1011))
    plate = make_plate(farm.storage / "plates", frames)
    out = str(farm.storage / "sh010" / "blur" / "sh010_blur.####.exr")
    spec = farm.farm().submit("blur", plate, out, frames, {"kernel_size": "3"}, chunk=3)
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()
    assert status.counts["done"] == 10

    model = Catalog(discover()).entry("blur").create()
    model.load("cpu")
    model.set_options({"kernel_size": 3})
    for f in frames:
        path = frame_path(out, f)
        inp = oiio.ImageInput.open(path)
        spec_ = inp.spec()
        inp.close()
        assert sorted(spec_.channelnames) == ["A", "B", "G", "R"]
        assert spec_.getattribute("mlfarm/job") == spec.id
        assert spec_.getattribute("mlfarm/model") == "blur"
        assert spec_.getattribute("mlfarm/model_version") == "2"
        assert json.loads(spec_.getattribute("mlfarm/options")) == {"kernel_size": 3}
        assert spec_.getattribute("mlfarm/source") == frame_path(plate, f)
        assert spec_.getattribute("mlfarm/frame") == f
        assert spec_.getattribute("compression") == "zips"  # the default: Nuke's own
        got = read_image(path).rgba(4)
        expected = model.inference([sample_pixels(f)])[0].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, expected)
