"""Depth Anything V2: relative depth per frame as Nuke's ``depth.Z``, with a viewable preview.

What ``depth.Z`` holds, by the ``mode`` option (the EXR header says it too, ``mlfarm/depth.Z``):

- ``inverse`` (default): what the network predicts, relative inverse depth: near = large, far tends
  to 0, with an unknown scale and shift per frame. Nuke's own depth.Z (ScanlineRender) is also 1/z,
  so ZDefocus takes it with *math* ``far = 0``.
- ``depth``: ``1 / max(inverse, 1e-6)``: far = large, as ZDefocus's *math* ``depth`` expects. Still
  relative: its scale is arbitrary.

``rgba`` is a grey preview of the inverse depth, normalised per frame (near = white), alpha 1.

Frames are converted to display-referred sRGB (the network was trained on such images), resized
on the device to the network's size as the model's own image processor would (short side to its
size, keeping the aspect ratio, each side a multiple of 14), and the prediction is resized back to
the plate's full size on the device; only the finished planes are copied to the host.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from mlfarm.models import BaseModel
from mlfarm.models.colour import linear_to_srgb
from mlfarm.models.options import Choice
from mlfarm.models.variants import Variants

from .settings import DepthSettings
from .weights import SIZES, fetch, folder, missing_message

#: ``depth`` mode: inverse depth below this is treated as this, so the sky stays finite.
EPSILON = 1e-6

MEANING = {
    "inverse": "relative inverse depth as predicted (near = large); ZDefocus math: far = 0",
    "depth": "1/max(inverse depth, 1e-6): relative depth (far = large); ZDefocus math: depth",
}


def depth_planes(inverse: Any, mode: str, torch: Any) -> tuple[Any, Any]:
    """``(depth.Z, rgba)`` for a batch of inverse-depth maps ``(B, H, W)``: ``(B, H, W, 1)`` and ``(B, H, W, 4)``."""
    inverse = inverse.float().clamp_min(0.0)
    z = inverse if mode == "inverse" else 1.0 / inverse.clamp_min(EPSILON)
    flat = inverse.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1)
    span = (flat.amax(1).view(-1, 1, 1) - lo).clamp_min(1e-12)
    grey = (inverse - lo) / span
    rgba = torch.stack([grey, grey, grey, torch.ones_like(grey)], dim=-1)
    return z[..., None], rgba


def network_size(height: int, width: int, size: int, multiple: int = 14) -> tuple[int, int]:
    """The network's input size for a ``height`` x ``width`` frame, as DPT's image processor picks it
    (``keep_aspect_ratio``): scale by whichever side's factor is nearer 1, round to ``multiple``."""
    scale_h, scale_w = size / height, size / width
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w
    else:
        scale_w = scale_h

    def fit(value: float) -> int:
        out = round(value / multiple) * multiple
        return int(out) if out > 0 else int(math.ceil(value / multiple) * multiple)

    return fit(scale_h * height), fit(scale_w * width)


@dataclass(frozen=True)
class Prepared:
    """A frame ready for the network (``preprocess``): its input ``(3, h, w)`` on the model's device,
    and the plate's ``(height, width)`` the depth is resized back to."""

    pixels: Any
    size: tuple[int, int]


class Model(BaseModel):
    settings_class = DepthSettings

    def __init__(self):
        super().__init__()
        self.name = "Depth Anything V2 (small: Apache-2.0; base, large: CC-BY-NC-4.0)"
        self.version = "1"
        self.size = Choice("small", tuple(SIZES))
        self.mode = Choice("inverse", ("inverse", "depth"))
        self.options = ("size", "mode")
        self.inputs = {"image": 3}
        self.outputs = {"rgba": 4, "depth": ("Z",)}
        self.device = "gpu"
        self.half_frames = True  # converted to float on the device, after the upload
        self.device_frames = True  # preprocess takes a frame decoded on the GPU as it is
        self.batch_size = 4
        self._nets: Variants[tuple[Any, dict[str, Any]]] = Variants()  # per size
        self.cuda_graphs = False  # set by load()

    # --- before anything runs ----------------------------------------------------------------
    def weight_variants(self) -> tuple[str, ...]:
        return tuple(SIZES)

    def default_weight_variants(self) -> tuple[str, ...]:
        return ("small",)

    def weight_licence(self, variant: str) -> str:
        return SIZES[variant][1]

    def fetch_weights(self, variant: str, weights_dir: Any) -> Any:
        return fetch(variant, weights_dir)

    def check_ready(self, settings: Any) -> str | None:
        return missing_message(settings.weights_dir, self.size.value)

    def weight_files(self, settings: Any) -> list[Any]:
        where = folder(settings.weights_dir, self.size.value)
        return sorted(p for p in where.iterdir() if p.is_file()) if where.is_dir() else []

    def frame_metadata(self) -> dict[str, Any]:
        return {"mlfarm/depth.Z": MEANING[self.mode.value], "mlfarm/depth_model": SIZES[self.size.value][0]}

    def load(self, device: str) -> None:
        import torch

        context = self.load_context(device)
        own = context.plugin_settings or DepthSettings()
        self.torch = torch
        self.torch_device = device
        self.weights_dir = context.settings.weights_dir
        self.batch_size = int(own.depth_batch_size)
        cuda = device.startswith("cuda")
        bf16 = cuda and torch.cuda.is_bf16_supported()
        self.autocast = torch.bfloat16 if own.depth_precision in ("auto", "bf16") and bf16 else None
        self.planes_stay = context.outputs_on_device
        self.cuda_graphs = cuda and bool(own.depth_cuda_graphs)

    def unload(self) -> None:
        self._nets.clear()

    def _network(self) -> tuple[Any, dict[str, Any]]:
        """The network for the chosen size and its processor's settings, loaded on first use. ``prep``'s
        ``predict`` runs the network on a batch of inputs: replayed as a CUDA graph where enabled."""
        size = self.size.value

        def build() -> tuple[Any, dict[str, Any]]:
            from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

            reason = missing_message(self.weights_dir, size)
            if reason:
                raise RuntimeError(reason)
            where = str(folder(self.weights_dir, size))
            net = DepthAnythingForDepthEstimation.from_pretrained(where, local_files_only=True)
            proc = AutoImageProcessor.from_pretrained(where, local_files_only=True)
            torch = self.torch
            prep = {
                "size": int(min(proc.size.get("height", 518), proc.size.get("width", 518))),
                "multiple": int(getattr(proc, "ensure_multiple_of", 14) or 14),
                "mean": torch.tensor(proc.image_mean, device=self.torch_device).view(1, 3, 1, 1),
                "std": torch.tensor(proc.image_std, device=self.torch_device).view(1, 3, 1, 1),
            }
            net = net.to(self.torch_device).eval()
            from mlfarm.models.cuda_graphs import GraphedFunction

            # The graph's output is its own buffer, overwritten by the lane's next replay: _planes
            # makes new tensors from it on the same stream before that.
            prep["predict"] = GraphedFunction(functools.partial(self._predict, net), enabled=self.cuda_graphs)
            return net, prep

        return self._nets.get(size, build)

    # --- frames ------------------------------------------------------------------------------------
    def preprocess(self, image_list: list[Any]) -> Prepared:
        """On the I/O threads: the frame uploaded, made display-referred, resized to the network's size
        and normalised, on that thread's own CUDA stream, so the lane that runs the network only stacks
        small ready tensors (stacking and uploading 1080p frames there capped the farm below the network)."""
        torch = self.torch
        _, prep = self._network()
        image = image_list[0]
        height, width = image.shape[:2]
        from mlfarm.exr.gpu import finished_here

        with finished_here(torch, self.torch_device), torch.inference_mode():
            # The whole frame goes up and loses its alpha there: slicing RGB out of RGBA on the host is a
            # strided copy, 8.5 ms of a core for a 1080p half frame against 1.8 for a contiguous one.
            linear = torch.as_tensor(image).to(self.torch_device)[..., :3].permute(2, 0, 1)[None].float()
            pixels = self._network_input(prep, linear)[0]
        return Prepared(pixels, (int(height), int(width)))

    def inference(self, image_list: list[Any]) -> list[Any]:
        return self.infer_batch([image_list])[0]

    def infer_batch(self, batch: list[Any]) -> list[list[Any]]:
        """``batch``: what ``preprocess`` made of each frame (raw image lists are prepared here)."""
        torch = self.torch
        _, prep = self._network()
        items = [item if isinstance(item, Prepared) else self.preprocess(item) for item in batch]
        out: list[list[Any]] = [[] for _ in batch]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((tuple(item.pixels.shape), item.size), []).append(i)
        cuda = str(self.torch_device).startswith("cuda")
        with torch.inference_mode():
            for (_, size), idx in groups.items():
                if cuda:  # made on an I/O thread's stream
                    from mlfarm.exr.gpu import used_here

                    used_here([items[i].pixels for i in idx])
                pixels = torch.stack([items[i].pixels for i in idx])
                z, rgba = self._planes(prep["predict"], pixels, size)
                if not self.planes_stay:
                    z, rgba = z.cpu().numpy(), rgba.cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = [rgba[j], z[j]]
        return out

    def _network_input(self, prep: dict[str, Any], linear: Any) -> Any:
        """Scene-linear frames ``(B, 3, H, W)`` to the network's input, as its image processor makes it:
        display-referred, resized (bicubic, antialiased) to ``network_size``, normalised."""
        torch = self.torch
        height, width = linear.shape[-2:]
        srgb = linear_to_srgb(linear, torch).clamp_(0.0, 1.0)
        h, w = network_size(height, width, prep["size"], prep["multiple"])
        pixels = torch.nn.functional.interpolate(srgb, size=(h, w), mode="bicubic", align_corners=False,
                                                 antialias=True)
        return (pixels - prep["mean"]) / prep["std"]

    def _predict(self, net: Any, pixels: Any) -> Any:
        """The network's relative inverse depth ``(B, h, w)`` for inputs ``(B, 3, h, w)``."""
        if self.autocast is not None:
            with self.torch.autocast("cuda", dtype=self.autocast):
                return net(pixel_values=pixels).predicted_depth
        return net(pixel_values=pixels).predicted_depth

    def _planes(self, predict: Any, pixels: Any, size: tuple[int, int]) -> tuple[Any, Any]:
        """Network inputs ``(B, 3, h, w)`` to ``(depth.Z, rgba)`` at the plate's ``size``, on the device."""
        torch = self.torch
        predicted = predict(pixels)
        inverse = torch.nn.functional.interpolate(predicted[:, None].float(), size=size, mode="bicubic",
                                                  align_corners=False)[:, 0]
        return depth_planes(inverse, self.mode.value, torch)
