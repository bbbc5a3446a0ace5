"""SAM 2.1 video segmentation: objects marked once are followed through the shot.

A ``sequence`` model: the worker streams a shot's frames through it in order, forward from the
first prompted frame and backward from it, one SAM 2 session per direction (see ``tracker.py``).
Prompts (points and/or a box per object, on one or more keyframes; ``mlfarm.prompts``) come with
the job; a prompt on a later frame corrects the object from there. A stream that resumes on another
worker starts from the masks it wrote on the frame before (SAM 2 takes them as mask prompts).

Outputs per frame (``planes.py``): ``rgba``, ``matte.A``, ``instance.id`` and ``<name>.A`` per named
object; the sidecar JSON lists every object with its box, pixel count, score and IoU estimate.
Input is scene-linear: it is converted to display-referred sRGB (0..1) for the network.
"""

from __future__ import annotations

from typing import Any

from mlfarm.models import BaseModel
from mlfarm.models.colour import linear_to_srgb
from mlfarm.models.options import Choice
from mlfarm.models.variants import Variants

from .planes import compose, object_stats, sidecar
from .settings import Sam2Settings
from .weights import SIZES, fetch, folder, missing_message

BASE_OUTPUTS: dict[str, Any] = {"rgba": 4, "matte": ("A",), "instance": ("id",)}


class Model(BaseModel):
    settings_class = Sam2Settings

    def __init__(self):
        super().__init__()
        self.name = "SAM 2.1 video segmentation (Apache-2.0)"
        self.version = "1"
        self.temporal = "sequence"
        self.promptable = True
        self.size = Choice("base-plus", tuple(SIZES))
        self.options = ("size",)
        self.inputs = {"image": 3}
        self.outputs = dict(BASE_OUTPUTS)
        self.device = "gpu"
        self.half_frames = True  # converted to float on the device, after the upload
        self.device_frames = True  # preprocess passes a frame decoded on the GPU on as it is
        self.sidecar_json = True
        self._trackers: Variants[Any] = Variants()  # per size

    # --- before anything runs ----------------------------------------------------------------
    def weight_variants(self) -> tuple[str, ...]:
        return tuple(SIZES)

    def default_weight_variants(self) -> tuple[str, ...]:
        return ("base-plus",)

    def weight_licence(self, variant: str) -> str:
        return "Apache-2.0"

    def fetch_weights(self, variant: str, weights_dir: Any) -> Any:
        return fetch(variant, weights_dir)

    def check_ready(self, settings: Any) -> str | None:
        return missing_message(settings.weights_dir, self.size.value)

    def weight_files(self, settings: Any) -> list[Any]:
        where = folder(settings.weights_dir, self.size.value)
        return sorted(p for p in where.iterdir() if p.is_file()) if where.is_dir() else []

    def outputs_for(self, prompts: Any) -> dict[str, Any]:
        """The planes of a job with these prompts: the model's own, then one per named object."""
        names = prompts.names if prompts is not None else {}
        return {**BASE_OUTPUTS, **{names[oid]: ("A",) for oid in sorted(names)}}

    def load(self, device: str) -> None:
        import torch

        context = self.load_context(device)
        own = context.plugin_settings or Sam2Settings()
        self.torch = torch
        self.torch_device = device
        self.weights_dir = context.settings.weights_dir
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        self.dtype = "bfloat16" if own.sam2_precision in ("auto", "bf16") and bf16 else "float32"
        self.lanes = int(own.sam2_lanes) if device.startswith("cuda") else 1
        self.cuda_graphs = bool(own.sam2_cuda_graphs)
        self.planes_stay = context.outputs_on_device

    def unload(self) -> None:
        self._trackers.clear()

    def _tracker(self) -> Any:
        size = self.size.value

        def build() -> Any:
            from .tracker import Sam2Tracker

            reason = missing_message(self.weights_dir, size)
            if reason:
                raise RuntimeError(reason)
            return Sam2Tracker(folder(self.weights_dir, size), self.torch_device, self.dtype, self.cuda_graphs)

        return self._trackers.get(size, build)

    # --- a stream ----------------------------------------------------------------------------------
    def _upload(self, item: Any) -> Any:
        """The frame's scene-linear RGB on the device (from pinned memory where preprocess put it, or
        decoded there on an I/O thread's stream, whose memory then stays the frame's until this
        thread's stream is done with it)."""
        frame = item[0]
        if self.torch.is_tensor(frame) and frame.is_cuda:
            from mlfarm.exr.gpu import used_here

            used_here([frame])
        return self.torch.as_tensor(frame).to(self.torch_device, non_blocking=True)[..., :3].float()

    def _display(self, linear: Any) -> Any:
        return linear_to_srgb(linear, self.torch).clamp(0.0, 1.0)

    def start_sequence(self, direction: str, prompts: Any, seed: Any = None) -> dict[str, Any]:
        """A SAM 2 session for one direction; from ``seed`` (the planes written on the frame before and
        that frame's input) when resuming."""
        self._own_stream()
        session = self._tracker().session()
        state = {"session": session, "prompts": prompts, "objects": list(prompts.object_ids),
                 "names": dict(prompts.names)}
        if seed is not None:
            ids = self.torch.as_tensor(seed.planes["instance"][..., 0])
            masks = {}
            for oid in state["objects"]:
                name = state["names"].get(oid)
                own = seed.planes.get(name) if name else None
                masks[oid] = self.torch.as_tensor(own[..., 0]) > 0.5 if own is not None else ids == oid
            session.step(self._display(self._upload(seed.item)), seed=masks)
        return state

    def preprocess(self, image_list: list[Any]) -> Any:
        """On the I/O threads: the frame into pinned memory, so its upload overlaps the GPU's work."""
        if not str(self.torch_device).startswith("cuda") or self.torch.is_tensor(image_list[0]):
            return image_list  # a tensor: decoded on the GPU already (``device_frames``)
        return [self.torch.from_numpy(image_list[0][..., :3]).pin_memory()]

    def _own_stream(self) -> None:
        """With several lanes, each lane thread steps its shots on its own CUDA stream (kept as the
        thread's current stream, so what the worker records after a step is on it too)."""
        if self.lanes > 1:
            from mlfarm.exr.gpu import thread_stream

            thread_stream(self.torch)

    def step(self, state: dict[str, Any], frame: int, item: Any, prompts: list[Any]) -> list[Any]:
        torch = self.torch
        self._own_stream()
        plate = self._upload(item)
        result = state["session"].step(self._display(plate), prompts)
        planes = compose(plate, result.logits, result.object_ids, state["names"], state["objects"])
        layout = self.outputs_for(state["prompts"])
        stats = object_stats(result.logits, result.scores, result.ious)
        names, objects, ids = state["names"], state["objects"], result.object_ids
        if self.planes_stay:  # the worker compresses on the GPU: only the small stats come back
            return [*(planes[name] for name in layout), _Pending(None, stats.cpu(), None, [], ids, names, objects)]
        # Every plane as half (ids and mattes are exact in half) in one block, copied back on a side
        # stream into pinned memory; the I/O thread that writes the frame waits for it (postprocess).
        widths = [planes[name].shape[-1] for name in layout]
        block = torch.cat([planes[name].half() for name in layout], dim=-1)
        if str(self.torch_device).startswith("cuda"):
            host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
            host_stats = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host.copy_(block, non_blocking=True)
            host_stats.copy_(stats, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return [_Pending(host, host_stats, done, widths, ids, names, objects)]
        return [_Pending(block, stats, None, widths, ids, names, objects)]

    def postprocess(self, outputs: list[Any]) -> list[Any]:
        if not outputs or not isinstance(outputs[-1], _Pending):
            return outputs
        pending = outputs[-1]
        if pending.done is not None:
            pending.done.synchronize()
        objects = sidecar(pending.stats.tolist(), pending.ids, pending.names, pending.objects)
        if pending.block is None:
            return [*outputs[:-1], *objects]
        block = pending.block.numpy()
        images, at = [], 0
        for width in pending.widths:
            images.append(block[..., at:at + width])
            at += width
        return [*images, *objects]


class _Pending:
    """A frame's planes and object stats on their way to the host (``step`` -> ``postprocess``)."""

    def __init__(self, block: Any, stats: Any, done: Any, widths: list[int], ids: list[int], names: dict[int, str],
                 objects: list[int]):
        self.block, self.stats, self.done, self.widths = block, stats, done, widths
        self.ids, self.names, self.objects = ids, names, objects
