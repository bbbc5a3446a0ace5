"""A trained run as a model plugin: listed in the catalog, run by batch jobs and interactively.

Each run folder under ``<storage root>/trained/`` becomes a model named after the run, with one
option, ``checkpoint``: ``newest`` (the default) or a step that is still on disk. Describing it
reads run.json and lists the checkpoint folder, nothing more; torch is imported and the weights
are read on the first frame, and read again only when the chosen checkpoint changes (a newer one
was written, or another step was asked for).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..base import BaseModel, InputError
from ..catalog import ModelEntry
from ..options import Choice
from .runs import RunError, list_checkpoints, read_config, trained_runs

log = logging.getLogger(__name__)

NEWEST = "newest"


class TrainedModel(BaseModel):
    """Shared by both templates; subclasses say what a frame becomes."""

    run_dir: Path = Path()  # set on the per-run subclass made by model_class()

    def __init__(self) -> None:
        super().__init__()
        self.config = read_config(self.run_dir)
        self.name = f"{self.config.name} (trained {self.config.template})"
        self.version = "1"
        self.inputs = {"input": 4}
        self.outputs = {"output": 4}
        self.options = ("checkpoint",)
        self.checkpoint = Choice(NEWEST, self._choices())
        self._net: Any = None
        self._loaded: Path | None = None

    # --- checkpoints --------------------------------------------------------------------
    def _steps(self) -> list[int]:
        return [step for step, _ in list_checkpoints(self.run_dir)]

    def _choices(self) -> list[str]:
        return [NEWEST] + [str(s) for s in reversed(self._steps())]

    def set_options(self, options: dict[str, Any]) -> None:
        # Checkpoints come and go while the model is warm: take the choices from the disk first.
        self.checkpoint = Choice(self.checkpoint.value if self.checkpoint.value in self._choices() else NEWEST,
                                 self._choices())
        wanted = options.get("checkpoint")
        if wanted is not None and str(wanted) not in self.checkpoint.choices:
            raise InputError(self._missing(str(wanted)))
        super().set_options(options)

    def _missing(self, wanted: str) -> str:
        kept = ", ".join(str(s) for s in self._steps()) or "none"
        return f"run {self.config.name} has no checkpoint at step {wanted} (on disk: {kept})"

    def checkpoint_path(self) -> Path:
        found = dict(list_checkpoints(self.run_dir))
        if not found:
            raise InputError(f"run {self.config.name} has no checkpoint yet")
        value = self.checkpoint.value
        if value == NEWEST:
            return found[max(found)]
        if int(value) not in found:
            raise InputError(self._missing(value))
        return found[int(value)]

    def check_ready(self, settings: Any) -> str | None:
        try:
            self.checkpoint_path()
        except InputError as exc:
            return str(exc)
        return None

    def weight_files(self, settings: Any) -> list[Any]:
        try:
            return [self.checkpoint_path()]
        except InputError:
            return []

    # --- running --------------------------------------------------------------------------
    def _network(self) -> Any:
        path = self.checkpoint_path()
        if path != self._loaded:
            from .checkpoints import load_checkpoint
            from .networks import build_network

            ckpt = load_checkpoint(path, with_optimizer=False)
            net = build_network(ckpt.config.template, ckpt.config.features, len(ckpt.config.classes))
            net.load_state_dict(ckpt.weights)
            self._net = net.to(self.torch_device).eval()
            self._loaded = path
            log.info("model %s: weights from %s", self.config.name, path.name)
        return self._net

    def unload(self) -> None:
        self._net, self._loaded = None, None

    def infer_batch(self, batch: list[list[Any]]) -> list[list[Any]]:
        import torch

        net = self._network()
        out = []
        with torch.inference_mode():
            for image_list in batch:
                image = np.asarray(image_list[0], dtype=np.float32)
                if image.ndim == 2:
                    image = image[:, :, None]
                # The frame goes to the device as it is (H x W x C) and is rearranged there: no
                # transposed copies of a whole frame on the CPU, one way or the other.
                pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.torch_device)
                rgb = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1].expand(-1, -1, 3)
                out.append(self._frame(net, image, pixels, rgb.permute(2, 0, 1)[None]))
        return out

    def _frame(self, net: Any, image: np.ndarray, pixels: Any, x: Any) -> list[Any]:
        raise NotImplementedError

    def describe(self, model_id: str) -> dict[str, Any]:
        desc = super().describe(model_id)
        desc["trained"] = {"template": self.config.template, "run": str(self.run_dir), "data": self.config.data,
                           "classes": list(self.config.classes), "steps": self._steps()}
        return desc


class TrainedImg2Img(TrainedModel):
    """The frame through the encoder-decoder; an alpha channel passes through unchanged."""

    def _frame(self, net: Any, image: np.ndarray, pixels: Any, x: Any) -> list[Any]:
        import torch

        out = net.run_frame(x)[0].permute(1, 2, 0)
        if pixels.shape[-1] > 3:
            out = torch.cat([out, pixels[..., 3:]], dim=-1)
        return [out.float().contiguous().cpu().numpy()]


class TrainedClassifier(TrainedModel):
    """The frame passes through; the label and every class's score come back as a result object
    (which the farm also writes into the output EXR's header as ``mlfarm/objects``)."""

    def _frame(self, net: Any, image: np.ndarray, pixels: Any, x: Any) -> list[Any]:
        import torch

        scores = torch.softmax(net(x)[0].float(), dim=0).cpu().numpy()
        classes = self.config.classes
        best = int(scores.argmax())
        result = {"label": classes[best], "score": round(float(scores[best]), 6),
                  "scores": {c: round(float(s), 6) for c, s in zip(classes, scores)}}
        return [image, result]


def model_class(folder: Path) -> type[TrainedModel]:
    """A subclass bound to one run folder: what the catalog hands out as the run's ``Model``."""
    template = read_config(folder).template
    base = {"img2img": TrainedImg2Img, "classify": TrainedClassifier}.get(template)
    if base is None:
        raise RunError(f"{folder}: unknown template {template!r}")
    return type(f"Trained_{folder.name}", (base,), {"run_dir": folder, "__module__": __name__})


def trained_entries(storage_root: Any) -> dict[str, ModelEntry]:
    """Catalog entries for the runs under ``storage_root`` that have a checkpoint."""
    return {name: ModelEntry(name, f"trained run {folder}", lambda folder=folder: model_class(folder), live=True)
            for name, folder in trained_runs(storage_root).items()}


def trained_source(settings: Any) -> dict[str, ModelEntry]:
    """The catalog's ``mlfarm.model_sources`` entry point: every trained run is a model."""
    return trained_entries(settings.storage_root)
