"""Mask R-CNN instance segmentation: torchvision's ``maskrcnn_resnet50_fpn`` (or ``_v2``), COCO classes.

Output planes, one EXR per frame: ``rgba`` (the seed's visualisation, or with ``binary_masks`` the
binary mask image; alpha is the union of kept instances), ``matte.A`` (that union), ``instance.id``
(0 background, 1..N best score first), ``class.id`` (COCO id) and ``score.value``. The detections
(id, class id, label, score, box, visible pixels) go into the EXR header and a ``.json`` sidecar.

The fast path: frames are copied into pinned memory on the I/O threads (``preprocess``), a batch
goes up to the GPU, is converted to sRGB there and runs through the network together; masks are
pasted and every plane is composed on the GPU. Where the worker compresses outputs on the GPU the
finished planes (half) stay there and only the detections come back; otherwise the planes come back
too, on a side stream without blocking the next batch. ``postprocess``, on an I/O thread again,
waits for that copy, builds the detections list and draws the class labels (into the device planes
on the thread's own stream, or into the host planes). The data planes are half: exact for
ids and classes, about four significant digits for scores (the exact ones are in the JSON).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlfarm.models import BaseModel, Choice, InputError
from mlfarm.models.cuda_graphs import GraphedFunction
from mlfarm.models.variants import Variants

from .coco import COCO_CATEGORIES, parse_classes
from .settings import MrcnnSettings
from .weights import ARCHITECTURES, WeightsError, fetch, find_weights, missing_message

log = logging.getLogger(__name__)


@dataclass
class Pending:
    """One frame's results on their way to the host: pinned buffers filled by an async copy."""

    ready: Any  # a CUDA event, or None when everything ran on the CPU
    planes: Any  # H x W x 8 half (rgba, then matte.A, instance.id, class.id, score.value), or with a
    # float rgba H x W x 4 float followed by ``data``
    data: Any  # None, or the H x W x 4 half data planes when rgba is float
    boxes: Any
    labels: Any
    scores: Any
    pixels: Any


# GPU memory for the full-frame masks of the frames composed together, while pasted (float32):
# 1 GiB is 128 masks at 1080p (a batch of 4 with 20 detections each), 30 at 4K.
_PASTE_BYTES = 1 << 30


def _same_size(batch: list[Any]) -> list[list[Any]]:
    """The batch in runs of frames of one size (a plate's frames normally all are)."""
    groups: list[list[Any]] = []
    for frame in batch:
        if groups and tuple(groups[-1][0].shape) == tuple(frame.shape):
            groups[-1].append(frame)
        else:
            groups.append([frame])
    return groups


class Model(BaseModel):
    settings_class = MrcnnSettings

    def __init__(self):
        super().__init__()
        self.name = "Mask R-CNN (COCO instances)"
        self.version = "1"
        self.architecture = Choice("maskrcnn_resnet50_fpn", tuple(ARCHITECTURES))
        self.thresh = 0.7
        self.show_box = True
        self.show_class = True
        self.alpha = 0.4
        self.show_border = True
        self.border_thick = 2
        self.bbox_thick = 1
        self.font_scale = 0.35
        self.binary_masks = False
        self.classes = ""
        self.max_detections = 100
        self.min_size = 800
        self.max_size = 1333
        self.options = ("architecture", "thresh", "show_box", "show_class", "alpha", "show_border", "border_thick",
                        "bbox_thick", "font_scale", "binary_masks", "classes", "max_detections", "min_size",
                        "max_size")
        self.option_ranges = {"thresh": (0.0, 1.0), "alpha": (0.0, 1.0), "border_thick": (1, 64),
                              "bbox_thick": (1, 64), "font_scale": (0.1, 5.0), "max_detections": (1, 1000),
                              "min_size": (32, 4096), "max_size": (32, 8192)}
        self.inputs = {"image": 3}
        self.outputs = {"rgba": 4, "matte": ("A",), "instance": ("id",), "class": ("id",), "score": ("value",)}
        self.device = "gpu"
        self.batch_size = 4
        self.sidecar_json = True
        self.raw_frames = True  # preprocess copies the frame into pinned memory itself
        self._nets: Variants[Any] = Variants()  # per architecture
        # Per (architecture, options the network reads): the network set up for them and its front, as
        # CUDA graphs. Views that share the weights, so chunks with different options run side by side.
        self._configured: Variants[tuple[Any, GraphedFunction]] = Variants()
        self.cuda_graphs = False  # set by load()
        self.planes_stay = False  # set by load(): True where the worker compresses outputs on the GPU
        self._weights_dir_path: Any = None  # set by load(): the settings' weights folder
        self._streams = threading.local()  # per lane thread: its CUDA stream and its copy stream

    # --- before anything runs ----------------------------------------------------------------
    def _weights_dir(self):
        return self._weights_dir_path

    def weight_variants(self) -> tuple[str, ...]:
        return tuple(ARCHITECTURES)

    def fetch_weights(self, variant: str, weights_dir: Any) -> Any:
        return fetch(variant, weights_dir)

    def check_ready(self, settings: Any) -> str | None:
        try:
            parse_classes(self.classes)
        except ValueError as exc:
            return f"option classes: {exc}"
        if int(self.max_size) < int(self.min_size):
            return f"max_size ({self.max_size}) must not be below min_size ({self.min_size})"
        arch = self.architecture.value
        if find_weights(arch, settings.weights_dir) is None:
            return missing_message(arch, settings.weights_dir)
        return None

    def weight_files(self, settings: Any) -> list[Any]:
        found = find_weights(self.architecture.value, settings.weights_dir)
        return [found] if found is not None else []

    def load(self, device: str) -> None:
        import torch

        context = self.load_context(device)
        settings, own = context.settings, context.plugin_settings
        self.torch = torch
        self.torch_device = device
        self._weights_dir_path = settings.weights_dir
        self.autocast = None
        self.channels_last = False
        self.half_rgba = bool(settings.exr_rgba_half)
        self.batch_size = int(own.mrcnn_batch_size)
        self.lanes = 1
        if device.startswith("cuda"):
            self.lanes = int(own.mrcnn_lanes)
            torch.cuda.init()
            tf32 = own.mrcnn_precision in ("tf32", "fp16")  # fp16: what autocast leaves in fp32 uses TF32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = True
            self.autocast = torch.float16 if own.mrcnn_precision == "fp16" else None
            self.channels_last = bool(own.mrcnn_channels_last)
            self.cuda_graphs = bool(own.mrcnn_cuda_graphs)
        from . import compose

        self.colours = torch.from_numpy(compose.palette()).to(device)
        # Planes the worker will compress on the GPU stay there: only the detections come back.
        self.planes_stay = context.outputs_on_device

    def unload(self) -> None:
        self._nets.clear()
        self._configured.clear()

    def _network(self):
        """The network for the chosen architecture, built from its weights file on first use."""
        arch = self.architecture.value

        def build() -> Any:
            from .network import build

            path = find_weights(arch, self._weights_dir())
            if path is None:
                raise WeightsError(missing_message(arch, self._weights_dir()))
            log.info("loading %s weights from %s", arch, path)
            net = build(arch, path).to(self.torch_device)
            if self.channels_last:
                net.backbone.to(memory_format=self.torch.channels_last)
            return net

        return self._nets.get(arch, build)

    def _configured_network(self, detections: int) -> tuple[Any, GraphedFunction]:
        """The network set up with this view's options (``network.configured``) and its front; made
        once per set of options (a few per job at most) and kept while the model is loaded."""
        key = (self.architecture.value, int(self.min_size), int(self.max_size), float(self.thresh), detections)

        def build() -> tuple[Any, GraphedFunction]:
            from . import network

            net = network.configured(self._network(), *key[1:])
            return net, GraphedFunction(functools.partial(self._front, net), enabled=self.cuda_graphs)

        return self._configured.get(key, build)

    def _front(self, net: Any, linear: Any) -> tuple[Any, Any]:
        """B x H x W x 3 scene-linear frames to their sRGB (which ``compose`` draws on) and the
        network's front: one CUDA graph replay on a GPU worker (``self._configured``)."""
        from mlfarm.models.colour import linear_to_srgb

        from . import network

        srgb = linear_to_srgb(linear, self.torch)
        return srgb, network.front(net, srgb.clamp(0, 1).permute(0, 3, 1, 2), self.channels_last, self.autocast)

    # --- per frame, on the I/O threads -------------------------------------------------------
    def preprocess(self, image_list: list[Any]) -> Any:
        img = image_list[0]
        channels = 1 if img.ndim == 2 else img.shape[2]
        if channels < 3:
            raise InputError(f"Mask R-CNN needs R, G and B channels; this frame has {channels} channel"
                             f"{'s' if channels != 1 else ''} (a greyscale frame must be shuffled to RGB first)")
        rgb = img[:, :, :3]
        torch = self.torch
        if self.torch_device.startswith("cuda"):
            pinned = torch.empty(rgb.shape, dtype=torch.float32, pin_memory=True)
            np.copyto(pinned.numpy(), rgb)  # frames are read as float32; other dtypes are converted
            return pinned
        return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))

    def postprocess(self, outputs: list[Any]) -> list[Any]:
        pending = outputs[0]
        if not isinstance(pending, Pending):
            return outputs
        if pending.ready is not None:
            pending.ready.synchronize()
        if self.planes_stay:  # device planes: labels are drawn, and the frame compressed, on this
            if pending.ready is not None:  # thread's stream
                from mlfarm.exr.gpu import thread_stream

                stream = thread_stream(self.torch)
                stream.wait_event(pending.ready)
                for t in (pending.planes, pending.data):
                    if t is not None:
                        t.record_stream(stream)
            block, data = pending.planes, pending.data
        else:  # one block when everything is half: the planes are channel slices of it, which
            block = pending.planes.numpy()  # the writer hands on without assembling a copy
            data = None if pending.data is None else pending.data.numpy()
        rgba = block[:, :, :4]
        data = block[:, :, 4:] if data is None else data
        labels = pending.labels.numpy()
        scores = pending.scores.numpy()
        boxes = pending.boxes.numpy()
        pixels = pending.pixels.numpy()
        detections = [
            {"id": i + 1, "class_id": int(labels[i]), "label": COCO_CATEGORIES[int(labels[i])],
             "score": float(scores[i]), "box": [float(v) for v in boxes[i]], "pixels": int(pixels[i])}
            for i in range(len(labels))
        ]
        if self.show_class and not self.binary_masks and detections:
            from .labels import draw_labels

            with self.torch.inference_mode():  # device planes were made in inference mode
                draw_labels(rgba[:, :, :3], detections, self.font_scale)
        height, width = rgba.shape[:2]
        return [rgba, data[:, :, 0], data[:, :, 1], data[:, :, 2], data[:, :, 3],
                {"detections": detections, "width": width, "height": height,
                 "architecture": self.architecture.value}]

    # --- a batch, on the worker's main thread --------------------------------------------------
    def inference(self, image_list: list[Any]) -> list[Any]:
        outputs = self.postprocess(self.infer_batch([self.preprocess(image_list)])[0])
        return [o.cpu().numpy() if isinstance(o, self.torch.Tensor) else o for o in outputs]

    def infer_batch(self, batch: list[Any]) -> list[list[Any]]:
        from . import network

        torch = self.torch
        keep = parse_classes(self.classes)
        # With a class filter the network must not stop at max_detections of other classes.
        net, front = self._configured_network(int(self.max_detections) if keep is None
                                              else max(100, int(self.max_detections)))
        results: list[list[Any]] = []
        with torch.inference_mode(), self._lane_stream():
            for group in _same_size(batch):  # frames of one size go through every step together
                linear = torch.stack([t.to(self.torch_device, non_blocking=True) for t in group])
                srgb, prepared = front(linear)
                found = network.heads(net, prepared, [tuple(linear.shape[1:3])] * len(group), self.autocast)
                results.extend([p] for p in self._compose_batch(linear, srgb, found, keep))
        return results

    def _compose_batch(self, linear: Any, srgb: Any, dets: list[dict[str, Any]], keep: frozenset[int] | None
                       ) -> list[Pending]:
        """B frames' planes (linear and srgb B x H x W x 3), composed together: every step is a
        few tensor operations for the whole batch, not for each frame. Why: on a GPU worker each
        operation hands the GIL to the I/O threads and waits to get it back, and composing frame
        by frame was the largest share of the thread feeding the GPU (profiled on an H100).

        Frames are padded to the most detections any of them kept. Groups of frames are bounded
        so that their pasted masks stay within ``_PASTE_BYTES`` (a frame alone may exceed it).
        """
        from . import compose

        picks = [compose.select(d["scores"], d["labels"], float(self.thresh), keep, int(self.max_detections))
                 for d in dets]
        most = max(1, max(len(p) for p in picks))
        step = max(1, _PASTE_BYTES // (most * linear.shape[1] * linear.shape[2] * 4))
        out: list[Pending] = []
        for at in range(0, len(dets), step):
            out.extend(self._compose_group(linear[at:at + step], srgb[at:at + step], dets[at:at + step],
                                           picks[at:at + step]))
        return out

    def _compose_group(self, linear: Any, srgb: Any, dets: list[dict[str, Any]], picks: list[Any]) -> list[Pending]:
        from mlfarm.models.colour import srgb_to_linear

        from . import compose

        torch = self.torch
        frames, height, width = linear.shape[:3]
        boxes, labels, scores, masks, valid = compose.pad_detections(dets, picks)
        n = boxes.shape[1]
        pasted = compose.paste_masks(masks.flatten(0, 1), boxes.flatten(0, 1), height, width) >= 0.5
        ids = compose.instance_ids(pasted.view(frames, n, height, width))
        del pasted
        pixels = compose.visible_pixels(ids, n)
        matte, class_id, score = compose.lookup_planes(ids, labels, scores)
        if self.binary_masks:
            rgb = matte[..., None].expand(-1, -1, -1, 3)
        else:
            picture, changed = compose.visualise(srgb, ids, boxes, float(self.alpha), bool(self.show_border),
                                                 int(self.border_thick), bool(self.show_box),
                                                 int(self.bbox_thick), self.colours, valid)
            rgb = torch.where(changed[..., None], srgb_to_linear(picture, torch), linear)
        rgba = torch.cat([rgb, matte[..., None]], dim=-1)
        # Data planes as half: exact for ids and classes (max_detections <= 1000 < 2048), about four
        # significant digits for scores (the exact ones are in the JSON), and an all-half EXR encodes
        # several times faster than one mixing half and float.
        data = torch.stack([matte, ids.float(), class_id, score], dim=-1).half()
        block = torch.cat([rgba.half(), data], dim=-1) if self.half_rgba else None
        pending = []
        for i, kept in enumerate(len(p) for p in picks):
            detections = (boxes[i, :kept], labels[i, :kept], scores[i, :kept], pixels[i, :kept])
            if block is not None:
                pending.append(self._to_host(block[i], None, *detections))
            else:
                pending.append(self._to_host(rgba[i], data[i], *detections))
        return pending

    def _stream(self, name: str) -> Any:
        """This thread's CUDA stream called ``name``, made on first use (streams are per thread so
        that lanes never queue behind one another)."""
        stream = getattr(self._streams, name, None)
        if stream is None:
            stream = self.torch.cuda.Stream()
            setattr(self._streams, name, stream)
        return stream

    def _lane_stream(self) -> Any:
        """With several lanes each lane thread runs its batches on its own stream; with one, the
        default stream as ever."""
        if self.lanes > 1 and self.torch_device.startswith("cuda"):
            return self.torch.cuda.stream(self._stream("compute"))
        return contextlib.nullcontext()

    def _to_host(self, *tensors: Any) -> Pending:
        """Start copying to pinned host memory on a side stream; ``postprocess`` waits on the event.

        The first two (the planes, and the data planes when rgba is float) stay on the GPU when the
        worker compresses them there; the event then also marks them finished.

        The copy runs on its own stream so the next batch's network does not queue behind it.
        """
        torch = self.torch
        if not self.torch_device.startswith("cuda"):
            return Pending(None, *(None if t is None else t.contiguous().clone() for t in tensors))
        copy_stream = self._stream("copy")
        copy_stream.wait_stream(torch.cuda.current_stream())
        host = []
        with torch.cuda.stream(copy_stream):
            for i, t in enumerate(tensors):
                if t is None or (i < 2 and self.planes_stay):  # the planes (and data) may stay on the GPU
                    host.append(t)
                    continue
                t = t.contiguous()
                t.record_stream(copy_stream)  # keep its memory until the copy has read it
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                host.append(buf)
            # A blocking event: the I/O thread waiting on it sleeps instead of spinning a core that
            # EXR encoding needs (CUDA's default wait spins, and 14 spinning threads starve the farm).
            ready = torch.cuda.Event(blocking=True)
            ready.record(copy_stream)
        return Pending(ready, *host)
