"""Mask R-CNN: weights from a file, the refusal without them, and whole jobs through a real worker.

The checkpoint is torchvision's architecture with random weights, saved the way torchvision's
published COCO file is (no BatchNorm batch counters), so the loading code is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import pytest
import torch

from mlfarm.client import SubmitError
from mlfarm.exr.io import read_image, sidecar_path
from mlfarm.frames import frame_path
from mlfarm.models.builtin.mrcnn.weights import ARCHITECTURES, WeightsError

from conftest import make_plate, sample_pixels, write_exr

V1 = "maskrcnn_resnet50_fpn"
SMALL = {"min_size": 64, "max_size": 96, "thresh": 0.0, "max_detections": 6}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torchvision

    torch.manual_seed(8)
    net = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    folder = tmp_path_factory.mktemp("weights")
    torch.save(state, folder / ARCHITECTURES[V1][0])
    return folder


def test_file_names_are_torchvisions_published_ones():
    import torchvision.models.detection as detection

    for arch, (name, enum_name) in ARCHITECTURES.items():
        assert Path(getattr(detection, enum_name).COCO_V1.url).name == name, arch


def test_weights_load_exactly_from_the_file(weights_dir):
    from mlfarm.models.builtin.mrcnn.network import build

    saved = torch.load(weights_dir / ARCHITECTURES[V1][0], weights_only=True)
    net = build(V1, weights_dir / ARCHITECTURES[V1][0], fold=False)
    loaded = net.state_dict()
    assert not net.training
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_batch_norms_fold_into_their_convolutions_without_changing_the_features(arch):
    """Every norm of both architectures is folded, and the backbone (with the FPN) computes what
    it did. The norms get non-trivial statistics first: freshly made ones are the identity."""
    import torchvision.models.detection as detection

    from mlfarm.models.builtin.mrcnn.network import _NORMS, fold_batch_norms

    torch.manual_seed(2)
    net = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=91).eval()
    norms = [m for m in net.modules() if isinstance(m, _NORMS)]
    assert len(norms) >= 53  # ResNet-50 alone has 53
    for m in norms:
        m.weight.data = torch.rand(m.weight.shape) + 0.5
        m.bias.data = torch.randn(m.bias.shape) * 0.1
        m.running_mean.data = torch.randn(m.running_mean.shape) * 0.1
        m.running_var.data = torch.rand(m.running_var.shape) + 0.5
    image = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        before = net.backbone(image)
        assert fold_batch_norms(net) == len(norms)
        after = net.backbone(image)
    assert not any(isinstance(m, _NORMS) for m in net.modules())
    for level, features in before.items():
        torch.testing.assert_close(after[level], features, rtol=1e-4, atol=1e-4 * float(features.abs().max()))


def _folded_net(arch: str, seed: int):
    """``arch`` with random weights, its batch norms folded (as ``build`` does before fusing)."""
    import torchvision.models.detection as detection

    from mlfarm.models.builtin.mrcnn.network import fold_batch_norms

    torch.manual_seed(seed)
    net = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=91).eval()
    fold_batch_norms(net)
    return net


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_relu_after_a_convolution_is_fused_and_the_network_finds_the_same(arch):
    """After folding, each bottleneck's three convolutions (the last with the residual sum) and
    every other convolution a ReLU follows become fused calls (the ReLUs left follow a transposed
    convolution or a linear layer, which cuDNN's calls do not take), and the network finds what it
    found: here on the CPU, where the fused modules run their steps one by one; the cuDNN calls
    themselves are checked on a GPU below."""
    from torchvision.models.resnet import Bottleneck

    from mlfarm.models.builtin.mrcnn import network

    net = _folded_net(arch, 3)
    blocks = sum(isinstance(m, Bottleneck) for m in net.modules())
    relus = sum(isinstance(m, torch.nn.ReLU) for m in net.modules()) - blocks  # a block's one ReLU serves 3 convs
    assert blocks == 16
    net = network.configured(net, 64, 100, 0.0, 10)
    image = torch.rand(3, 80, 96)
    with torch.inference_mode():
        before = network.run(net, [image])[0]
        fused = network.fuse_relus(net)
        after = network.run(net, [image])[0]
    left = [list(parent.children())[i - 1] for parent in net.modules()
            for i, m in enumerate(parent.children()) if isinstance(m, torch.nn.ReLU)]
    assert left and all(isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.Linear)) for m in left)
    assert fused == 3 * blocks + relus - len(left)
    assert not any(isinstance(m, Bottleneck) for m in net.modules())
    assert sum(isinstance(m, network.ConvReLU) for m in net.modules()) == fused
    assert len(before["labels"]) > 0
    for key in ("labels", "scores", "boxes", "masks"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's fused calls need a CUDA GPU")
def test_cudnns_fused_calls_compute_what_the_separate_steps_compute():
    from mlfarm.models.builtin.mrcnn import network

    plain = _folded_net(V1, 4).cuda()
    fused = _folded_net(V1, 4).cuda()
    network.fuse_relus(fused)
    image = torch.rand(2, 3, 256, 320, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # both sides in full fp32, so they agree closely
    try:
        with torch.inference_mode():
            want, got = plain.backbone(image), fused.backbone(image)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for level, features in want.items():
        torch.testing.assert_close(got[level], features, rtol=1e-4, atol=1e-4 * float(features.abs().max()))


def test_the_network_split_in_front_and_heads_finds_what_torchvisions_forward_finds():
    """``network.front`` (normalising with tensors made once: a CUDA graph cannot capture
    torchvision's per-call copy of them) then ``network.heads`` is torchvision's forward, stopped
    before the mask paste: same padded batch, same detections."""
    import torchvision.models.detection as detection

    from mlfarm.models.builtin.mrcnn import network

    torch.manual_seed(5)
    net = detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    net = network.configured(net, 64, 100, 0.0, 10)
    images = [torch.rand(3, 48, 80), torch.rand(3, 60, 40), torch.rand(3, 48, 80)]
    with torch.inference_mode():
        front = network.front(net, images)
        theirs, _ = net.transform(images)
        ours = network.heads(net, front, [tuple(i.shape[-2:]) for i in images])
        expected = net(images)
    assert front.batch.image_sizes == theirs.image_sizes
    torch.testing.assert_close(front.batch.tensors, theirs.tensors, rtol=0, atol=1e-6)
    for found, wanted in zip(ours, expected, strict=True):
        assert len(found["labels"]) > 0
        assert torch.equal(found["labels"], wanted["labels"])
        torch.testing.assert_close(found["scores"], wanted["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(found["boxes"], wanted["boxes"], rtol=1e-4, atol=1e-3)
        assert found["masks"].shape == (len(found["labels"]), 28, 28)


def test_weights_for_another_architecture_are_refused_clearly(weights_dir, tmp_path):
    from mlfarm.models.builtin.mrcnn.network import build

    wrong = tmp_path / ARCHITECTURES["maskrcnn_resnet50_fpn_v2"][0]
    wrong.write_bytes((weights_dir / ARCHITECTURES[V1][0]).read_bytes())
    with pytest.raises(WeightsError, match="does not fit maskrcnn_resnet50_fpn_v2"):
        build("maskrcnn_resnet50_fpn_v2", wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read the weights file"):
        build(V1, junk)


def test_submit_without_weights_is_refused_and_queues_nothing(farm, tmp_path):
    plate = make_plate(farm.storage / "plates", [1, 2], width=32, height=24)
    empty = tmp_path / "no-weights"
    client = farm.farm(weights_dir=empty)
    with pytest.raises(SubmitError) as refused:
        client.submit("mrcnn", plate, str(farm.storage / "out" / "m.####.exr"), [1, 2])
    message = str(refused.value)
    assert str(empty / ARCHITECTURES[V1][0]) in message
    assert "mlfarm models fetch mrcnn" in message
    assert client.jobs() == []
    with pytest.raises(SubmitError, match="unknown COCO class 'persn'"):
        farm.farm(weights_dir=empty).submit("mrcnn", plate, str(farm.storage / "o" / "m.####.exr"), [1],
                                            {"classes": "person, persn"})


def planes(path: str) -> dict[str, np.ndarray]:
    image = read_image(path)
    return {name: image.pixels[:, :, i] for i, name in enumerate(image.channels)}


def test_the_batch_size_comes_from_the_settings(monkeypatch):
    from mlfarm.models.builtin.mrcnn.model import Model
    from mlfarm.settings import get_settings

    monkeypatch.setenv("MLFARM_MRCNN_BATCH_SIZE", "3")
    get_settings.cache_clear()
    try:
        model = Model()
        assert model.batch_size == 4  # declared before load, as the catalog shows it
        model.load("cpu")
        assert model.batch_size == 3
    finally:
        get_settings.cache_clear()


def test_job_through_a_worker_writes_consistent_planes_and_sidecars(farm, weights_dir):
    farm.env_overrides["MLFARM_WEIGHTS_DIR"] = str(weights_dir)
    farm.env_overrides["MLFARM_MRCNN_BATCH_SIZE"] = "3"  # batches of 3 and 2 (frame 4 fails on its own)
    worker = farm.start_worker()
    frames = [1, 2, 3, 4, 5]
    plate = make_plate(farm.storage / "plates", frames)
    write_exr(farm.storage / "plates" / "plate.0004.exr", sample_pixels(4)[:, :, :1], ("Y",))  # greyscale
    out = str(farm.storage / "sh010" / "mrcnn" / "sh010_mrcnn.####.exr")
    spec = farm.farm().submit("mrcnn", plate, out, frames, SMALL, chunk=5)
    status = farm.wait_job(spec.id, timeout=240)
    assert status.counts["done"] == 4 and status.counts["failed"] == 1, status.summary()
    reason = status.failed_frames[0].reason
    assert "Mask R-CNN needs R, G and B channels; this frame has 1 channel" in reason, reason
    assert not Path(frame_path(out, 4)).exists() and not Path(sidecar_path(frame_path(out, 4))).exists()

    for f in (1, 2, 3, 5):
        path = frame_path(out, f)
        p = planes(path)
        assert sorted(p) == sorted(["R", "G", "B", "A", "matte.A", "instance.id", "class.id", "score.value"])
        spec_ = oiio.ImageInput.open(path)
        header = json.loads(spec_.spec().getattribute("mlfarm/objects"))
        file_format, mixed = str(spec_.spec().format), list(spec_.spec().channelformats)
        spec_.close()
        assert file_format == "half" and not mixed, (file_format, mixed)  # all half: exact ids, fast to encode
        sidecar = json.loads(Path(sidecar_path(path)).read_text())
        assert sidecar["objects"] == header and sidecar["frame"] == f and sidecar["job"] == spec.id
        dets = header[0]["detections"]
        assert 1 <= len(dets) <= SMALL["max_detections"]
        assert [d["id"] for d in dets] == list(range(1, len(dets) + 1))
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        ids = p["instance.id"].astype(np.int64)
        assert set(np.unique(ids)) <= set(range(len(dets) + 1))
        np.testing.assert_array_equal(p["matte.A"], (ids > 0).astype(np.float32))
        np.testing.assert_array_equal(p["A"], p["matte.A"])
        classes = np.array([0] + [d["class_id"] for d in dets], np.float32)
        scores = np.array([0] + [d["score"] for d in dets], np.float16).astype(np.float32)
        np.testing.assert_array_equal(p["class.id"], classes[ids])
        np.testing.assert_array_equal(p["score.value"], scores[ids])
        assert [d["pixels"] for d in dets] == [int((ids == d["id"]).sum()) for d in dets]
    assert "loading maskrcnn_resnet50_fpn weights from" in worker.log()


def test_zero_detections_and_a_worker_without_weights(farm, weights_dir, tmp_path):
    farm.env_overrides["MLFARM_WEIGHTS_DIR"] = str(weights_dir)
    farm.start_worker()
    plate = make_plate(farm.storage / "plates", [1, 2])
    out = str(farm.storage / "none" / "m.####.exr")
    spec = farm.farm().submit("mrcnn", plate, out, [1, 2], {**SMALL, "thresh": 1.0})
    status = farm.wait_job(spec.id, timeout=240)
    assert status.state == "done", status.summary()
    for f in (1, 2):
        p = planes(frame_path(out, f))
        assert not any(p[n].any() for n in ("A", "matte.A", "instance.id", "class.id", "score.value"))
        assert json.loads(Path(sidecar_path(frame_path(out, f))).read_text())["objects"][0]["detections"] == []
    farm.stop()

    # A client without the model folder (Nuke) cannot check; the worker refuses with the same reason.
    empty = tmp_path / "empty"
    farm.env_overrides["MLFARM_WEIGHTS_DIR"] = str(empty)
    farm.start_worker(name="w9@test")
    spec = farm.farm().submit("mrcnn", plate, str(farm.storage / "nw" / "m.####.exr"), [1, 2], SMALL,
                              include_local=False)
    status = farm.wait_job(spec.id, timeout=120)
    assert status.counts["failed"] == 2
    for fs in status.failed_frames:
        assert f"no weights for maskrcnn_resnet50_fpn: looked for {empty / ARCHITECTURES[V1][0]}" in fs.reason
        assert "mlfarm models fetch mrcnn" in fs.reason


def test_models_fetch_refuses_a_model_without_downloadable_weights_and_listing_still_works(farm):
    refused = farm.cli("models", "fetch", "blur")
    assert refused.returncode == 2
    assert "no downloadable weights for 'blur' (fetchable: depth, flow, mrcnn, sam2)" in refused.stderr
    listing = farm.cli("models", "--local", "--json", check=True)
    described = json.loads(listing.stdout)["mrcnn"]
    assert described["outputs"] == {"rgba": 4, "matte": ["A"], "instance": ["id"], "class": ["id"], "score": ["value"]}
    assert {o["name"] for o in described["options"]} >= {"thresh", "classes", "max_detections", "architecture"}


def test_mlclient_gateway_runs_mrcnn_through_its_pre_and_postprocess(monkeypatch, weights_dir):
    """The MLClient path (worker and --local) runs a model as a chunk does: preprocess, infer_batch,
    postprocess. Mask R-CNN needs all three: its infer_batch takes prepared tensors, and its
    postprocess turns pending device results into planes and detections."""
    from mlfarm.exchange.images import WireImage
    from mlfarm.exchange.inference import run_model
    from mlfarm.models.catalog import Catalog, discover
    from mlfarm.settings import get_settings

    monkeypatch.setenv("MLFARM_WEIGHTS_DIR", str(weights_dir))
    get_settings.cache_clear()
    try:
        model = Catalog(discover()).entry("mrcnn").create()
        model.load("cpu")
        image = sample_pixels(3, width=96, height=64)
        images, objects = run_model(model, {**SMALL, "show_class": False}, [WireImage.from_array(image)])
    finally:
        get_settings.cache_clear()
    assert [i.to_array().shape for i in images] == [(64, 96, 4), (64, 96, 1), (64, 96, 1), (64, 96, 1), (64, 96, 1)]
    dets = objects[0]["detections"]
    assert 1 <= len(dets) <= SMALL["max_detections"]
    ids = images[2].to_array()[:, :, 0]
    assert set(np.unique(ids).astype(int)) <= set(range(len(dets) + 1))
    np.testing.assert_array_equal(images[1].to_array()[:, :, 0], (ids > 0).astype(np.float32))


def test_a_batch_of_frames_of_two_sizes_gives_each_frame_its_own_planes(monkeypatch, weights_dir):
    """A batch runs through the network and the compositing in runs of frames of one size: results
    come back in the batch's order, each the size of its frame and with the frame's own detections
    (as the frame alone gets them, up to the arithmetic of a different batch size)."""
    from mlfarm.models.catalog import Catalog, discover
    from mlfarm.settings import get_settings

    monkeypatch.setenv("MLFARM_WEIGHTS_DIR", str(weights_dir))
    get_settings.cache_clear()
    try:
        model = Catalog(discover()).entry("mrcnn").create()
        model.load("cpu")
        model.set_options({**SMALL, "show_class": False})
        frames = [sample_pixels(k, width=w, height=h)[:, :, :3] for k, (w, h) in
                  enumerate([(96, 64), (80, 72), (96, 64)])]
        batch = model.infer_batch([model.preprocess([f]) for f in frames])
        alone = [model.infer_batch([model.preprocess([f])])[0] for f in frames]
    finally:
        get_settings.cache_clear()
    assert len(batch) == 3
    for frame, together, single in zip(frames, batch, alone):
        planes, by_itself = model.postprocess(together), model.postprocess(single)
        assert [p.shape for p in planes[:5]] == [frame.shape[:2] + (4,)] + [frame.shape[:2]] * 4
        dets, expected = planes[5]["detections"], by_itself[5]["detections"]
        assert dets and [d["class_id"] for d in dets] == [d["class_id"] for d in expected]
        np.testing.assert_allclose([d["score"] for d in dets], [d["score"] for d in expected], atol=1e-4)
        np.testing.assert_allclose([d["box"] for d in dets], [d["box"] for d in expected], atol=1e-2)


def test_chunks_with_different_options_share_the_warm_network_without_mixing_them(monkeypatch, weights_dir):
    """Two jobs set Mask R-CNN differently (threshold, detections, size) and run on one warm
    model at once, from two threads: each gets what it gets alone, and the shared network keeps
    torchvision's own settings (nothing one job set stays behind for the other)."""
    import threading

    from mlfarm.models.catalog import Catalog, discover
    from mlfarm.settings import get_settings

    monkeypatch.setenv("MLFARM_WEIGHTS_DIR", str(weights_dir))
    get_settings.cache_clear()
    try:
        model = Catalog(discover()).entry("mrcnn").create()
        model.load("cpu")
        net = model._network()
        shared = (net.transform.min_size, net.transform.max_size, net.roi_heads.score_thresh,
                  net.roi_heads.detections_per_img)
        views = {"a": model.with_options({**SMALL, "show_class": False}),
                 "b": model.with_options({**SMALL, "show_class": False, "thresh": 0.5, "max_detections": 2,
                                          "min_size": 80, "max_size": 112})}
        frame = sample_pixels(4, width=96, height=64)[:, :, :3]

        def detections(view) -> list:
            return view.postprocess(view.infer_batch([view.preprocess([frame])])[0])[5]["detections"]

        alone = {k: detections(v) for k, v in views.items()}
        together: dict[str, list] = {"a": [], "b": []}

        def run(name: str) -> None:
            for _ in range(3):
                together[name].append(detections(views[name]))

        threads = [threading.Thread(target=run, args=(k,)) for k in views]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        get_settings.cache_clear()
    assert len(alone["a"]) > len(alone["b"]) >= 0 and len(alone["a"]) <= SMALL["max_detections"]
    assert len(alone["b"]) <= 2 and all(d["score"] >= 0.5 for d in alone["b"])
    for name, runs in together.items():
        assert len(runs) == 3
        for dets in runs:
            assert [d["class_id"] for d in dets] == [d["class_id"] for d in alone[name]], name
            np.testing.assert_allclose([d["score"] for d in dets], [d["score"] for d in alone[name]], atol=1e-5)
    assert (net.transform.min_size, net.transform.max_size, net.roi_heads.score_thresh,
            net.roi_heads.detections_per_img) == shared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_graphed_front_gives_the_eager_detections(monkeypatch, weights_dir):
    """With MLFARM_MRCNN_CUDA_GRAPHS the transform and backbone are replayed from a CUDA graph
    after the first batch of a shape: every later batch must find what eager runs find on the same
    frames, and a change of min_size must not replay a graph captured for another resize."""
    from mlfarm.models.catalog import Catalog, discover
    from mlfarm.settings import get_settings

    monkeypatch.setenv("MLFARM_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("MLFARM_MRCNN_PRECISION", "fp32")
    monkeypatch.setenv("MLFARM_EXR_GPU_COMPRESS", "false")
    results = {}
    for graphs in (True, False):
        monkeypatch.setenv("MLFARM_MRCNN_CUDA_GRAPHS", str(graphs).lower())
        get_settings.cache_clear()
        try:
            model = Catalog(discover()).entry("mrcnn").create()
            model.load("cuda")
            found = []
            for min_size in (64, 64, 64, 80, 80, 80):
                model.set_options({**SMALL, "min_size": min_size, "max_size": 128, "show_class": False})
                frames = [sample_pixels(k + min_size, width=96, height=64)[:, :, :3] for k in range(2)]
                out = model.infer_batch([model.preprocess([f]) for f in frames])
                found.append([model.postprocess(o)[5]["detections"] for o in out])
            results[graphs] = found
            assert sum(front.graphs for _, front in model._configured) == (2 if graphs else 0)
        finally:
            get_settings.cache_clear()
    for graphed, eager in zip(results[True], results[False]):
        for g, e in zip(graphed, eager):
            assert g and [d["class_id"] for d in g] == [d["class_id"] for d in e]
            np.testing.assert_allclose([d["score"] for d in g], [d["score"] for d in e], atol=1e-4)
            np.testing.assert_allclose([d["box"] for d in g], [d["box"] for d in e], atol=1e-2)
