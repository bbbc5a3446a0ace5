"""Where Mask R-CNN's weights come from: a file, never an implicit download.

The files are torchvision's published COCO state dicts under their published names (the hash
prefix in the name is what ``torch.hub`` checks a download against). They are looked for in
``MLFARM_WEIGHTS_DIR`` first, then in the model's own folder; ``mlfarm models fetch mrcnn`` puts
them in the first. This module imports no torch until something is actually loaded or fetched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_DIR = Path(__file__).resolve().parent

#: Architecture -> (file name, torchvision weights enum name). The names are torchvision's.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "maskrcnn_resnet50_fpn": ("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "MaskRCNN_ResNet50_FPN_Weights"),
    "maskrcnn_resnet50_fpn_v2": ("maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", "MaskRCNN_ResNet50_FPN_V2_Weights"),
}


class WeightsError(RuntimeError):
    """Weights that are missing or do not fit; the message says where they were looked for and what to do."""


def search_dirs(weights_dir: Path | None) -> list[Path]:
    return [d for d in (weights_dir, MODEL_DIR) if d is not None]


def find_weights(arch: str, weights_dir: Path | None) -> Path | None:
    name = ARCHITECTURES[arch][0]
    for folder in search_dirs(weights_dir):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_message(arch: str, weights_dir: Path | None) -> str:
    name = ARCHITECTURES[arch][0]
    where = " or ".join(str(d / name) for d in search_dirs(weights_dir))
    return (f"no weights for {arch}: looked for {where}. Get them with `mlfarm models fetch mrcnn --arch {arch}` "
            f"on a machine with internet (or copy {name} from torchvision's model zoo into MLFARM_WEIGHTS_DIR)")


def load_state_dict(path: Path, torch: Any) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read the weights file {path}: {exc}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict")
    return state


def fetch(arch: str, weights_dir: Path) -> Path:
    """Download torchvision's COCO weights for ``arch`` into ``weights_dir`` (hash-checked, atomic)."""
    import torch
    import torchvision.models.detection as detection

    name, enum_name = ARCHITECTURES[arch]
    weights = getattr(detection, enum_name).COCO_V1
    if Path(weights.url).name != name:
        raise WeightsError(f"torchvision now publishes {Path(weights.url).name}, mlfarm expects {name}")
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = weights_dir / name
    if dest.is_file():
        log.info("%s already present", dest)
        return dest
    # download_url_to_file writes a temporary file and moves it into place once the hash matches.
    torch.hub.download_url_to_file(weights.url, str(dest), hash_prefix=name.rsplit("-", 1)[1].split(".")[0])
    return dest
