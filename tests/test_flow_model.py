"""The flow plugin on the CPU: Nuke's sign and units for motion vectors, exactly, and the real RAFT
loading path (random weights saved to a file) on small frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfarm.models.builtin.flow.model import Model, nuke_planes, pad_size
from mlfarm.models.builtin.flow.weights import ARCHITECTURES
from mlfarm.models.context import LoadContext
from mlfarm.settings import Settings
from mlfarm.temporal import Window


def moving_plate(frames: int, h: int = 40, w: int = 56) -> list[np.ndarray]:
    """Scene-linear frames whose content moves 3 px right and 2 px down every frame."""
    out = []
    for f in range(frames):
        img = np.full((h, w, 3), 0.05, np.float32)
        y, x = 8 + 2 * f, 10 + 3 * f
        img[y:y + 6, x:x + 8] = 0.8
        out.append(img)
    return out


class ShiftOracle(torch.nn.Module):
    """Stands in for RAFT: finds each pair's integer shift and returns it as a flow field in
    torchvision's convention (dx right, dy down, from the first frame to the second)."""

    def forward(self, first, second, num_flow_updates=12):
        flows = []
        for a, b in zip(first, second):
            best = min(((dx, dy) for dx in range(-5, 6) for dy in range(-5, 6)),
                       key=lambda s: float((torch.roll(a, shifts=(s[1], s[0]), dims=(1, 2)) - b).abs().sum()))
            flows.append(torch.tensor(best, dtype=torch.float32).view(2, 1, 1).expand(2, *a.shape[-2:]))
        return [torch.stack(flows)]


def windows(plate: list[np.ndarray]) -> list[Window]:
    last = len(plate) - 1
    out = []
    for f in range(len(plate)):
        frames = (max(f - 1, 0), f, min(f + 1, last))
        out.append(Window(frame=f, frames=frames, items=tuple([plate[g]] for g in frames)))
    return out


def loaded(tmp_path, arch="raft_small") -> Model:
    settings = Settings(weights_dir=tmp_path / "weights", storage_root=tmp_path / "storage")
    model = Model()
    model.setup(LoadContext.for_model(model, "cpu", settings))
    return model.with_options({"arch": arch})


def test_motion_vectors_follow_nukes_convention_u_right_v_up(tmp_path):
    model = loaded(tmp_path)
    model._nets.get(model.arch.value, ShiftOracle)  # stands in for the network the first call would load
    out = model.infer_batch(windows(moving_plate(4)))
    (rgba0, fwd0, bwd0, notes0), (_, fwd1, bwd1, _), _, (rgba3, fwd3, bwd3, notes3) = out
    assert rgba0.shape == (40, 56, 4) and (rgba0[..., 3] == 1).all() and (rgba3[..., :3] == 0).all()
    assert fwd0.shape == (40, 56, 2) and fwd0.dtype == np.float32
    assert (fwd0[..., 0] == 3).all() and (fwd0[..., 1] == -2).all()  # right 3, down 2 = v -2 (Nuke's y is up)
    assert (bwd1[..., 0] == -3).all() and (bwd1[..., 1] == 2).all()  # to the previous frame: the other way
    assert (bwd0 == 0).all() and (fwd3 == 0).all()  # no previous / no next frame: zeros, and said so
    assert notes0["backward"] == "zeros: no previous frame" and "forward" not in notes0
    assert notes3["forward"] == "zeros: no next frame" and notes3["previous"] == 2
    plane_f, plane_b = nuke_planes(torch.tensor([[[1.5]], [[4.0]]]), None, torch.zeros(3, 1, 1), torch)
    assert plane_f.tolist() == [[[1.5, -4.0]]] and plane_b.tolist() == [[[0.0, 0.0]]]


def test_each_pair_is_computed_once_per_batch(tmp_path):
    model = loaded(tmp_path)
    calls = []

    def counting(pairs):
        calls.extend(pairs)
        return [torch.zeros(2, *pairs[0][0].shape[-2:]) for _ in pairs]

    model.flows = counting
    model.infer_batch(windows(moving_plate(5)))
    assert len(calls) == 8  # 4 forward and 4 backward pairs among 5 frames, none twice


def test_raft_loads_random_weights_from_a_file_and_runs_on_small_frames(tmp_path):
    import torchvision.models.optical_flow as flow

    torch.manual_seed(0)
    (tmp_path / "weights").mkdir()
    torch.save(flow.raft_small(weights=None).state_dict(), tmp_path / "weights" / ARCHITECTURES["raft_small"][0])
    model = loaded(tmp_path).with_options({"arch": "raft_small", "updates": 2})
    assert model.check_ready(Settings(weights_dir=tmp_path / "weights")) is None
    assert "mlfarm models fetch flow --arch raft_large" in Model().check_ready(Settings(weights_dir=tmp_path / "w"))
    out = model.infer_batch(windows(moving_plate(3)))
    assert [o[1].shape for o in out] == [(40, 56, 2)] * 3 and all(np.isfinite(o[1]).all() for o in out)
    # Half plates reach the plugin as half (half_frames) and give exactly what their float32 values give.
    assert model.half_frames
    halves = [p.astype(np.float16) for p in moving_plate(3)]
    got, want = model.infer_batch(windows(halves)), model.infer_batch(windows([h.astype(np.float32) for h in halves]))
    for a, b in zip(got, want):
        for x, y in zip(a[:3], b[:3]):
            np.testing.assert_array_equal(x, y)
    assert pad_size(40, 56) == (128, 128) and pad_size(1080, 1920) == (1080, 1920) and pad_size(130, 7) == (136, 128)


def test_a_call_out_of_gpu_memory_is_made_again_with_half_the_pairs(tmp_path, caplog):
    """Another worker process on the GPU can take memory after this one measured what fits: the call
    is made again smaller, the smaller size is kept, and the planes are those of calls that fit."""
    sizes: list[int] = []
    fits = {"pairs": 2}

    class Tight(ShiftOracle):
        def forward(self, first, second, num_flow_updates=12):
            sizes.append(len(first))
            if len(first) > fits["pairs"]:
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            return super().forward(first, second, num_flow_updates)

    plate = moving_plate(5)
    roomy = loaded(tmp_path)
    roomy._nets.get(roomy.arch.value, ShiftOracle)
    want = roomy.infer_batch(windows(plate))
    model = loaded(tmp_path)
    model._nets.get(model.arch.value, Tight)
    model.batch_size = 8
    with caplog.at_level("WARNING", logger="mlfarm.models.builtin.flow.model"):
        got = model.infer_batch(windows(plate))
    assert sizes == [8, 4, 2, 2, 2, 2]  # 8 pairs: too many, then 4, then four calls of 2
    assert "out of GPU memory at 8 pairs a call" in caplog.text
    for a, b in zip(got, want):
        for x, y in zip(a[:3], b[:3]):
            np.testing.assert_array_equal(x, y)
    sizes.clear()
    model.infer_batch(windows(plate))
    assert sizes == [2, 2, 2, 2]  # the size that fitted is kept
    fits["pairs"] = 0  # not even one pair fits: that is the frame's failure, not a loop
    with pytest.raises(torch.OutOfMemoryError):
        model.infer_batch(windows(plate))
