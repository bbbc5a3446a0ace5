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

from .planes import compose, objects_sidecar
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
        self.sidecar_json = True
        self._trackers: dict[str, Any] = {}

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
        self.planes_stay = context.outputs_on_device

    def unload(self) -> None:
        self._trackers.clear()

    def _tracker(self) -> Any:
        size = self.size.value
        if size not in self._trackers:
            from .tracker import Sam2Tracker

            reason = missing_message(self.weights_dir, size)
            if reason:
                raise RuntimeError(reason)
            self._trackers[size] = Sam2Tracker(folder(self.weights_dir, size), self.torch_device, self.dtype)
        return self._trackers[size]

    # --- a stream ----------------------------------------------------------------------------------
    def _display(self, item: Any) -> Any:
        torch = self.torch
        linear = torch.as_tensor(item[0]).to(self.torch_device)[..., :3].float()
        return linear_to_srgb(linear, torch).clamp_(0.0, 1.0)

    def start_sequence(self, direction: str, prompts: Any, seed: Any = None) -> dict[str, Any]:
        """A SAM 2 session for one direction; from ``seed`` (the planes written on the frame before and
        that frame's input) when resuming."""
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
            session.step(self._display(seed.item), seed=masks)
        return state

    def step(self, state: dict[str, Any], frame: int, item: Any, prompts: list[Any]) -> list[Any]:
        result = state["session"].step(self._display(item), prompts)
        plate = self.torch.as_tensor(item[0]).to(self.torch_device)
        planes = compose(plate, result.logits, result.object_ids, state["names"], state["objects"])
        layout = self.outputs_for(state["prompts"])
        images = [planes[name] for name in layout]
        if not self.planes_stay:
            images = [p.cpu().numpy() for p in images]
        objects = objects_sidecar(result.logits, result.object_ids, result.scores, result.ious, state["names"],
                                  state["objects"])
        return [*images, *objects]
