"""SAM 2's model-level pieces on the CPU: the streaming tracker on a tiny random model loaded through
the real loading code, and the planes and sidecar made from its masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfarm.models.builtin.sam2.planes import compose, instance_ids, object_colour, objects_sidecar
from mlfarm.prompts import parse_inline

from tiny_models import sam2_video


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from mlfarm.models.builtin.sam2.tracker import Sam2Tracker

    folder = sam2_video(tmp_path_factory.mktemp("weights") / "sam2-tiny")
    return Sam2Tracker(folder, device="cpu")


def plate(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.random((h, w, 3), dtype=np.float32) for _ in range(n)]


def session_bytes(session) -> int:
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor) and id(x) not in seen:
            seen.add(id(x))
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    state = session.state
    walk(state.processed_frames)
    walk(state.output_dict_per_obj)
    walk(state.frames_tracked_per_obj)
    return total


def test_objects_keep_their_ids_through_prompts_corrections_and_every_frame(tracker):
    prompts = parse_inline(["0:car:box=8,8,30,40:neg=28,36", "0:dog:pos=45,10;50,20", "5:car:pos=22,22"])
    session = tracker.session()
    results = [session.step(f, prompts.at(k)) for k, f in enumerate(plate(8))]
    for r in results:
        assert r.object_ids == [1, 2] and tuple(r.logits.shape) == (2, 48, 64)
        assert all(0 <= s <= 1 for s in r.scores) and all(i is not None for i in r.ious)
    outputs = session.state.output_dict_per_obj
    assert sorted(outputs[0]["cond_frame_outputs"]) == [0, 5] and sorted(outputs[1]["cond_frame_outputs"]) == [0]

    with pytest.raises(ValueError, match="no object to follow yet"):
        tracker.session().step(plate(1)[0])


def test_memory_stays_flat_over_a_long_shot_and_sessions_do_not_mix(tracker):
    frames = plate(60)
    box = parse_inline(["0:car:box=8,8,30,40"])
    long = tracker.session()
    sizes = []
    for k, f in enumerate(frames):
        long.step(f, box.at(k))
        sizes.append(session_bytes(long))
    assert max(sizes[30:]) <= sizes[25] * 1.05  # flat once SAM 2's look-back window is full

    # Two shots on one warm model, interleaved frame by frame, give what each gives alone.
    other = parse_inline(["0:dog:box=30,5,60,30"])
    alone = [tracker.session() for _ in range(2)]
    a = [alone[0].step(f, box.at(k)).logits for k, f in enumerate(frames[:6])]
    b = [alone[1].step(f, other.at(k)).logits for k, f in enumerate(frames[6:12])]
    s1, s2 = tracker.session(), tracker.session()
    for k in range(6):
        assert torch.equal(s1.step(frames[k], box.at(k)).logits, a[k])
        assert torch.equal(s2.step(frames[6 + k], other.at(k)).logits, b[k])


def test_a_session_starts_from_seed_masks(tracker):
    seed = torch.zeros(48, 64, dtype=torch.bool)
    seed[10:30, 12:40] = True
    r = tracker.session().step(plate(1)[0], seed={3: seed})
    assert r.object_ids == [3]
    assert float((r.masks[0] == seed).float().mean()) > 0.99  # SAM 2 returns a mask prompt as its output


def test_planes_instance_ids_and_the_union_matte_agree_exactly():
    logits = torch.full((3, 4, 5), -1.0)
    logits[0, :2, :] = 2.0  # object 1: top two rows
    logits[1, 1:3, :] = 3.0  # object 4 overlaps row 1 with a higher logit
    ids = instance_ids(logits, [1, 4, 7])  # object 7: nowhere
    assert ids.tolist() == [[1.0] * 5, [4.0] * 5, [4.0] * 5, [0.0] * 5]
    plate_px = np.full((4, 5, 4), 0.2, np.float32)
    planes = compose(plate_px, logits, [1, 4, 7], {1: "car", 7: "ghost", 9: "gone"}, [1, 4, 7, 9])
    assert set(planes) == {"rgba", "matte", "instance", "car", "ghost", "gone"}
    assert torch.equal(planes["matte"][..., 0], (planes["instance"][..., 0] > 0).float())
    assert torch.equal(planes["rgba"][..., 3], planes["matte"][..., 0])
    assert planes["car"][..., 0].tolist()[1] == [1.0] * 5  # its own matte: overlaps kept
    assert float(planes["ghost"].sum()) == 0 and float(planes["gone"].sum()) == 0
    tinted = torch.tensor(object_colour(4)) * 0.5 + 0.2 * 0.5
    assert torch.allclose(planes["rgba"][2, 0, :3], tinted)
    assert torch.allclose(planes["rgba"][3, 0, :3], torch.full((3,), 0.2))  # background untouched

    side = objects_sidecar(logits, [1, 4, 7], [0.9, 0.8, 0.1], [0.95, None, 0.5], {1: "car"}, [1, 4, 7, 9])
    assert [(o["id"], o["present"], o["box"], o["pixels"]) for o in side] == [
        (1, True, [0, 0, 5, 2], 10), (4, True, [0, 1, 5, 3], 10), (7, False, None, 0), (9, False, None, 0)]
    assert side[0]["name"] == "car" and side[0]["score"] == 0.9 and side[1]["iou"] is None


def test_frames_are_resized_and_normalised_on_the_device_as_the_image_processor_does(tracker):
    frame = plate(1, 96, 128)[0]
    ours, size = tracker.session()._pixels(frame)
    theirs = tracker.processor(images=torch.from_numpy(frame).permute(2, 0, 1), do_rescale=False, return_tensors="pt")
    assert size == [96, 128] and [int(v) for v in theirs.original_sizes[0]] == size
    assert ours.shape == theirs.pixel_values[0].shape
    torch.testing.assert_close(ours, theirs.pixel_values[0], atol=1e-5, rtol=0)  # bilinear, antialiased: the same


def test_a_session_tracks_exactly_as_the_librarys_own_streaming_calls(tracker):
    """Our session hands SAM 2 each frame's image features (made by the tracker's encoder, a CUDA
    graph on a GPU) before the model's call; the masks must be the library's own, bit for bit."""
    frames = plate(6)
    box = parse_inline(["0:obj:box=8,6,40,30"]).at(0)
    ours = tracker.session()
    mine = [ours.step(frames[0], box).logits] + [ours.step(f).logits for f in frames[1:]]

    processor, model = tracker.processor, tracker.model
    state = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
    theirs = []
    with torch.inference_mode():
        for k, f in enumerate(frames):
            pixels, size = ours._pixels(f)
            if k == 0:
                processor.add_inputs_to_inference_session(state, frame_idx=0, obj_ids=[1],
                                                          input_boxes=[[[8.0, 6.0, 40.0, 30.0]]], original_size=size)
            out = model(inference_session=state, frame=pixels, frame_idx=k)
            masks = processor.post_process_masks([out.pred_masks], original_sizes=[size], binarize=False)
            theirs.append(masks[0][:, 0])
    assert len(mine) == len(theirs) == 6
    for k, (a, b) in enumerate(zip(mine, theirs)):
        assert torch.equal(a, b), f"frame {k}: logits differ by {(a - b).abs().max()}"
