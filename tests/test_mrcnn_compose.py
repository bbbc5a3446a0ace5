"""Mask R-CNN's plane composition, checked exactly against detections built by hand (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlfarm.models.catalog import Catalog, discover

from conftest import sample_pixels


@pytest.fixture(scope="module")
def mrcnn():
    model = Catalog(discover()).entry("mrcnn").create()
    model.load("cpu")
    return model


@pytest.fixture(scope="module")
def compose(mrcnn):
    import importlib

    return importlib.import_module(type(mrcnn).__module__.rsplit(".", 1)[0] + ".compose")


def detections(boxes, labels, scores, cells=28):
    """Detections whose masks fill their whole box, so the pasted masks are exactly the boxes."""
    n = len(boxes)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "masks": torch.ones(n, cells, cells)}


def painted_ids(boxes, order, height, width):
    """The expected instance.id plane, painted the slow obvious way: worst instance first, best last."""
    ids = np.zeros((height, width), np.int32)
    for rank in reversed(range(len(order))):
        x0, y0, x1, y1 = (int(v) for v in boxes[order[rank]])
        ids[y0:y1, x0:x1] = rank + 1
    return ids


def run(model, image, det, **options):
    model.set_options({"thresh": 0.5, "classes": "", "max_detections": 100, "binary_masks": False, **options})
    from mlfarm.models.builtin.mrcnn.coco import parse_classes  # the installed copy: same code

    lin = torch.from_numpy(image[:, :, :3].copy())
    from mlfarm.models.colour import linear_to_srgb

    [pending] = model._compose_batch(lin[None], linear_to_srgb(lin, torch)[None], [det],
                                     parse_classes(model.classes))
    return model.postprocess([pending])


BOXES = [[2, 3, 20, 15], [10, 8, 30, 25], [40, 30, 60, 45], [0, 0, 8, 8], [50, 2, 63, 12]]
LABELS = [1, 3, 1, 18, 3]
SCORES = [0.9, 0.95, 0.6, 0.4, 0.8]


def test_paste_of_a_full_mask_is_exactly_its_box(compose):
    boxes = torch.tensor([[3.0, 5.0, 17.0, 11.0], [0.0, 0.0, 64.0, 48.0]])
    pasted = compose.paste_masks(torch.ones(2, 28, 28), boxes, 48, 64) >= 0.5
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        expected = np.zeros((48, 64), bool)
        expected[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(pasted[i].numpy(), expected)


def test_paste_follows_the_mask_inside_the_box(compose):
    mask = torch.zeros(1, 28, 28)
    mask[0, :, :14] = 1.0  # left half of the box
    pasted = compose.paste_masks(mask, torch.tensor([[8.0, 4.0, 36.0, 32.0]]), 40, 48)[0] >= 0.5
    expected = np.zeros((40, 48), bool)
    expected[4:32, 8:22] = True
    np.testing.assert_array_equal(pasted.numpy(), expected)


def test_select_obeys_threshold_classes_and_limit_best_first(compose):
    scores = torch.tensor(SCORES)
    labels = torch.tensor(LABELS)
    assert compose.select(scores, labels, 0.5, None, 100).tolist() == [1, 0, 4, 2]
    assert compose.select(scores, labels, 0.5, {3}, 100).tolist() == [1, 4]
    assert compose.select(scores, labels, 0.0, None, 2).tolist() == [1, 0]
    assert compose.select(scores, labels, 0.99, None, 100).tolist() == []
    tied = torch.tensor([0.7, 0.7, 0.7])
    assert compose.select(tied, torch.tensor([1, 1, 1]), 0.5, None, 100).tolist() == [0, 1, 2]


def test_every_plane_agrees_with_the_detections(mrcnn):
    image = sample_pixels(7)
    out = run(mrcnn, image, detections(BOXES, LABELS, SCORES), thresh=0.5)
    rgba, matte, inst, cls, score, meta = out
    order = [1, 0, 4, 2]  # scores >= 0.5, best first
    expected = painted_ids(BOXES, order, 48, 64)
    np.testing.assert_array_equal(inst, expected.astype(np.float32))
    np.testing.assert_array_equal(matte, (expected > 0).astype(np.float32))
    np.testing.assert_array_equal(cls, np.array([0] + [LABELS[i] for i in order], np.float32)[expected])
    np.testing.assert_array_equal(score, np.array([0] + [SCORES[i] for i in order], np.float16)[expected])
    for plane in (matte, inst, cls, score):
        assert plane.dtype == np.float16  # written as half: exact for ids and classes
    np.testing.assert_array_equal(rgba[:, :, 3], matte)
    dets = meta["detections"]
    assert [d["id"] for d in dets] == [1, 2, 3, 4]
    assert [d["class_id"] for d in dets] == [LABELS[i] for i in order]
    assert [d["label"] for d in dets] == ["car", "person", "car", "person"]
    assert [d["score"] for d in dets] == [float(np.float32(SCORES[i])) for i in order]
    assert [d["box"] for d in dets] == [[float(v) for v in BOXES[i]] for i in order]
    assert [d["pixels"] for d in dets] == [int((expected == k).sum()) for k in (1, 2, 3, 4)]
    assert (meta["width"], meta["height"]) == (64, 48)


def test_class_filter_and_limit_reach_every_plane(mrcnn):
    out = run(mrcnn, sample_pixels(3), detections(BOXES, LABELS, SCORES), thresh=0.0, classes="car, dog",
              max_detections=2)
    _, matte, inst, cls, _, meta = out
    order = [1, 4]  # cars (3) and the dog (18, score 0.4) ranked by score, limited to two
    expected = painted_ids(BOXES, order, 48, 64)
    np.testing.assert_array_equal(inst, expected.astype(np.float32))
    np.testing.assert_array_equal(matte, (expected > 0).astype(np.float32))
    assert set(np.unique(cls)) == {0.0, 3.0}
    assert [d["class_id"] for d in meta["detections"]] == [3, 3]


def test_no_detections_gives_empty_planes_and_the_untouched_image(mrcnn):
    image = sample_pixels(11)
    rgba, matte, inst, cls, score, meta = run(mrcnn, image, detections(BOXES, LABELS, SCORES), thresh=0.99)
    assert meta["detections"] == []
    for plane in (matte, inst, cls, score, rgba[:, :, 3]):
        assert plane.shape == (48, 64) and not plane.any()
    np.testing.assert_array_equal(rgba[:, :, :3], image[:, :, :3].astype(np.float16))


def test_binary_masks_is_the_matte_in_every_channel(mrcnn):
    rgba, matte, *_ = run(mrcnn, sample_pixels(5), detections(BOXES, LABELS, SCORES), binary_masks=True)
    for c in range(4):
        np.testing.assert_array_equal(rgba[:, :, c], matte)


def test_visualisation_tints_instances_and_leaves_the_rest_alone(mrcnn, compose):
    image = sample_pixels(9)
    rgba, matte, inst, *_ = run(mrcnn, image, detections(BOXES, LABELS, SCORES), show_box=False,
                                show_border=False, show_class=False, alpha=0.5)
    outside = matte == 0
    rgb = image[:, :, :3].astype(np.float16)
    np.testing.assert_array_equal(rgba[:, :, :3][outside], rgb[outside])
    assert not np.isclose(rgba[:, :, :3][~outside], rgb[~outside], rtol=1e-2).all(axis=1).any()


@pytest.mark.parametrize("at_once", [128, 8, 4])
def test_frames_composed_as_a_batch_match_each_frame_composed_alone(mrcnn, monkeypatch, at_once):
    """A batch is padded to the most detections any frame kept: the padding must leave no trace.
    Frames with 4, 2 and 0 kept detections; at_once is the masks pasted at once (8: two frames at
    a time; 4: one)."""
    import sys

    from mlfarm.models.builtin.mrcnn.coco import parse_classes
    from mlfarm.models.colour import linear_to_srgb

    monkeypatch.setattr(sys.modules[type(mrcnn).__module__], "_PASTE_BYTES", at_once * 48 * 64 * 4)
    mrcnn.set_options({"thresh": 0.5, "classes": "", "max_detections": 100, "binary_masks": False,
                       "show_class": True, "show_box": True, "show_border": True})
    dets = [detections(BOXES, LABELS, SCORES),
            detections([[30, 5, 50, 40], [1, 20, 12, 47]], [44, 1], [0.7, 0.55]),
            detections([[5, 5, 9, 9]], [1], [0.2])]  # below the threshold: nothing kept
    linear = torch.from_numpy(np.stack([sample_pixels(k)[:, :, :3] for k in (1, 2, 3)]))
    srgb = linear_to_srgb(linear, torch)
    keep = parse_classes("")
    together = [mrcnn.postprocess([p]) for p in mrcnn._compose_batch(linear, srgb, dets, keep)]
    alone = [mrcnn.postprocess(mrcnn._compose_batch(linear[i:i + 1], srgb[i:i + 1], dets[i:i + 1], keep))
             for i in range(3)]
    assert [len(t[5]["detections"]) for t in together] == [4, 2, 0]
    for t, a in zip(together, alone):
        for plane_t, plane_a in zip(t[:5], a[:5]):
            np.testing.assert_array_equal(plane_t, plane_a)
        assert t[5] == a[5]


def test_borders_lie_inside_instances_at_id_changes(compose):
    ids = torch.zeros(12, 12, dtype=torch.int32)
    ids[2:8, 2:8] = 1
    ids[4:10, 6:11] = 2
    border = compose.border_mask(ids, 1).numpy()
    a = ids.numpy()
    expected = np.zeros_like(border)
    for y in range(12):
        for x in range(12):
            if a[y, x]:
                hood = a[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                expected[y, x] = (hood != a[y, x]).any()
    np.testing.assert_array_equal(border, expected)


def test_box_outlines_are_drawn_inside_the_box(compose):
    outline = compose.box_outlines(torch.tensor([[2.0, 3.0, 9.0, 8.0]]), 12, 12, 2).numpy()
    expected = np.zeros((12, 12), bool)
    expected[3:8, 2:9] = True
    expected[5:6, 4:7] = False
    np.testing.assert_array_equal(outline, expected)


def test_class_labels_are_drawn_above_their_box(mrcnn):
    image = sample_pixels(2, width=128, height=96)
    det = detections([[20, 40, 100, 90]], [1], [0.9])
    with_label = run(mrcnn, image, det, show_class=True, show_box=False, show_border=False)[0]
    without = run(mrcnn, image, det, show_class=False, show_box=False, show_border=False)[0]
    changed = np.argwhere((with_label != without).any(axis=2))
    assert len(changed) > 20
    assert changed[:, 0].max() < 40 and changed[:, 1].min() >= 20  # above the box, from its left edge


def test_labels_drawn_into_device_planes_match_the_host_drawing():
    """Where the worker compresses on the GPU, labels are pasted into the tensor itself: same pixels."""
    from mlfarm.models.builtin.mrcnn.labels import draw_labels

    dets = [{"label": "person", "score": 0.91, "box": [20.0, 40.0, 100.0, 90.0]},
            {"label": "car", "score": 0.5, "box": [120.0, 2.0, 127.0, 30.0]},  # clipped at the right edge
            {"label": "dog", "score": 0.77, "box": [3.0, 5.0, 30.0, 30.0]}]  # no room above: drawn inside
    host = sample_pixels(4, width=128, height=96)[:, :, :3].astype(np.float16)
    device = torch.from_numpy(host.copy())
    draw_labels(host, dets, 0.35)
    draw_labels(device, dets, 0.35)
    np.testing.assert_array_equal(device.numpy(), host)
    assert (host != sample_pixels(4, width=128, height=96)[:, :, :3].astype(np.float16)).any(axis=2).sum() > 100


def test_overlapping_labels_show_the_later_one_as_pasting_in_turn_would():
    """All of a frame's labels go in one indexed write: where they overlap, the later detection's
    label is on top, as when each is pasted in turn (the reference below)."""
    from mlfarm.models.builtin.mrcnn.labels import draw_labels, label_patch

    dets = [{"label": "person", "score": 0.91, "box": [20.0, 40.0, 100.0, 90.0]},
            {"label": "dog", "score": 0.5, "box": [30.0, 44.0, 90.0, 80.0]},  # overlaps the first label
            {"label": "car", "score": 0.66, "box": [26.0, 38.0, 60.0, 70.0]}]
    base = sample_pixels(6, width=128, height=96)[:, :, :3].copy()
    expected = base.copy()
    for det in dets:
        patch = label_patch(f"{det['label']} {det['score']:.2f}", 0.35, "float32")
        y0, x0 = round(det["box"][1]) - patch.shape[0], round(det["box"][0])
        expected[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch
    assert (expected != base).any(axis=2).sum() > 100
    host, device = base.copy(), torch.from_numpy(base.copy())
    draw_labels(host, dets, 0.35)
    draw_labels(device, dets, 0.35)
    np.testing.assert_array_equal(host, expected)
    np.testing.assert_array_equal(device.numpy(), expected)


def test_planes_left_on_the_device_are_the_host_planes(mrcnn):
    """With GPU compression the planes stay tensors (labels pasted into them): same pixels, same
    detections. As in the worker, they are made in inference mode and finished outside it."""
    from mlfarm.models.builtin.mrcnn.coco import parse_classes
    from mlfarm.models.colour import linear_to_srgb

    image = sample_pixels(5, width=96, height=64)
    mrcnn.set_options({"thresh": 0.5, "classes": "", "max_detections": 100, "binary_masks": False,
                       "show_class": True})
    lin = torch.from_numpy(image[:, :, :3].copy())
    results = []
    for stay in (False, True):
        mrcnn.planes_stay = stay
        try:
            with torch.inference_mode():
                [pending] = mrcnn._compose_batch(lin[None], linear_to_srgb(lin, torch)[None],
                                                 [detections(BOXES, LABELS, SCORES)], parse_classes(""))
            results.append(mrcnn.postprocess([pending]))
        finally:
            mrcnn.planes_stay = False
    host, device = results
    assert all(isinstance(p, torch.Tensor) for p in device[:5])
    for h, d in zip(host[:5], device[:5]):
        np.testing.assert_array_equal(d.numpy(), h)
    assert device[5] == host[5] and host[5]["detections"]
