"""The depth plugin on the CPU: its depth.Z conventions exactly, its resize as the model's own image
processor does it, and a tiny random Depth Anything loaded through the real loading code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfarm.models.builtin.depth.model import EPSILON, MEANING, Model, depth_planes, network_size
from mlfarm.models.context import LoadContext
from mlfarm.settings import Settings

from tiny_models import depth_anything


def test_depth_z_holds_what_each_mode_says_exactly():
    inverse = torch.tensor([[[4.0, 2.0], [0.5, 0.0]]])  # near = large, as the network predicts
    z, rgba = depth_planes(inverse, "inverse", torch)
    assert z.shape == (1, 2, 2, 1) and torch.equal(z[..., 0], inverse)
    z, _ = depth_planes(inverse, "depth", torch)
    assert z[..., 0].tolist() == [[[0.25, 0.5], [2.0, 1.0 / EPSILON]]]  # 1/x, far = large, the sky finite
    assert rgba.shape == (1, 2, 2, 4) and rgba[..., 3].eq(1).all()
    assert rgba[0, 0, 0, :3].tolist() == [1.0, 1.0, 1.0] and rgba[0, 1, 1, :3].tolist() == [0.0, 0.0, 0.0]
    assert set(MEANING) == {"inverse", "depth"}


@pytest.mark.parametrize("height, width, size", [(48, 64, 56), (1080, 1920, 518), (480, 640, 518), (64, 48, 56),
                                                 (100, 100, 518), (2160, 4096, 518)])
def test_the_network_size_is_the_image_processors(height, width, size):
    from transformers import DPTImageProcessor

    proc = DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14)
    got = proc(images=np.zeros((height, width, 3), np.float32), do_rescale=False, return_tensors="pt")
    assert network_size(height, width, size) == tuple(got.pixel_values.shape[-2:])


def test_a_tiny_depth_anything_runs_through_the_real_loading_code(tmp_path):
    settings = Settings(weights_dir=tmp_path / "weights", storage_root=tmp_path / "storage")
    model = Model()
    assert "mlfarm models fetch depth --size small" in model.check_ready(settings)
    depth_anything(settings.weights_dir / "depth-anything-v2-small")
    assert model.check_ready(settings) is None
    model.setup(LoadContext.for_model(model, "cpu", settings))
    rng = np.random.default_rng(1)
    frames = [[rng.random((48, 64, 3), dtype=np.float32) * 2] for _ in range(3)]
    out = model.with_options({"mode": "depth"}).infer_batch(frames)
    assert len(out) == 3
    for rgba, z in out:
        assert rgba.shape == (48, 64, 4) and z.shape == (48, 64, 1) and z.dtype == np.float32
        assert np.isfinite(z).all() and (z > 0).all()
    inverse = model.infer_batch(frames[:1])[0][1]
    np.testing.assert_allclose(out[0][1], 1.0 / np.maximum(inverse, EPSILON), rtol=1e-5)
    assert model.with_options({"mode": "depth"}).frame_metadata()["mlfarm/depth.Z"] == MEANING["depth"]
    # Half plates reach the plugin as half (half_frames) and give exactly what their float32 values give.
    assert model.half_frames
    halves = [[f[0].astype(np.float16)] for f in frames]
    for got, want in zip(model.infer_batch(halves), model.infer_batch([[h[0].astype(np.float32)] for h in halves])):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_graphed_network_gives_the_eager_planes(monkeypatch, tmp_path):
    """With MLFARM_DEPTH_CUDA_GRAPHS the network is replayed from a CUDA graph after the first batch of
    a shape: each later batch, of new frames, must give the planes eager runs give, and the planes of
    one batch must not change when the next batch replays the graph (its output buffer is reused)."""
    from mlfarm.settings import get_settings

    settings = Settings(weights_dir=tmp_path / "weights", storage_root=tmp_path / "storage")
    depth_anything(settings.weights_dir / "depth-anything-v2-small")
    monkeypatch.setenv("MLFARM_DEPTH_PRECISION", "fp32")
    rng = np.random.default_rng(2)
    batches = [[[rng.random((48, 64, 3), dtype=np.float32)] for _ in range(2)] for _ in range(4)]
    results = {}
    for graphs in (True, False):
        monkeypatch.setenv("MLFARM_DEPTH_CUDA_GRAPHS", str(graphs).lower())
        get_settings.cache_clear()
        try:
            model = Model()
            model.setup(LoadContext.for_model(model, "cuda", settings))
            outs = [model.infer_batch([model.preprocess(f) for f in frames]) for frames in batches]
            results[graphs] = [[[np.array(torch.as_tensor(p).cpu()) for p in planes] for planes in out]
                               for out in outs]  # read after every batch ran: replays must not reach them
            assert model._network()[1]["predict"].graphs == (1 if graphs else 0)
        finally:
            get_settings.cache_clear()
    for graphed, eager in zip(results[True], results[False]):
        for g, e in zip(graphed, eager):
            for gp, ep in zip(g, e):
                np.testing.assert_allclose(gp, ep, rtol=1e-4, atol=1e-5)
    assert not np.allclose(results[True][0][0][1], results[True][1][0][1])  # different frames, different depth
