"""Building torchvision's Mask R-CNN from a weights file, and running it without its mask paste.

torchvision's ``forward`` ends by pasting every detection's mask into a full-frame float image
(N x H x W) with a Python loop; a script then copies all of them to the host. Here the network
stops at the heads: boxes, labels, scores and the small per-box mask probabilities stay on the
device and ``compose`` builds the planes from them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torchvision.models import detection
from torchvision.models.detection.transform import resize_boxes

from .coco import NUM_CLASSES
from .weights import WeightsError, load_state_dict


def build(arch: str, weights: Path) -> torch.nn.Module:
    """The architecture with randomly initialised layers, then every tensor from ``weights`` (strict)."""
    net = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    state = load_state_dict(weights, torch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{weights} does not fit {arch}: {' '.join(first)[:400]}") from None
    return net.eval()


def configure(net: Any, min_size: int, max_size: int, score_thresh: float, detections: int) -> None:
    net.transform.min_size = (int(min_size),)
    net.transform.max_size = int(max_size)
    net.roi_heads.score_thresh = float(score_thresh)
    net.roi_heads.detections_per_img = int(detections)


def run(net: Any, images: list[torch.Tensor], channels_last: bool = False,
        autocast: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """3 x H x W display-referred images in [0, 1] to per-image ``boxes`` (in the input's pixels),
    ``labels``, ``scores`` and ``masks`` (N x 28 x 28 probabilities of the predicted class)."""
    sizes = [tuple(img.shape[-2:]) for img in images]
    batch, _ = net.transform(images)
    if channels_last:
        batch.tensors = batch.tensors.contiguous(memory_format=torch.channels_last)
    cast = (torch.autocast(batch.tensors.device.type, dtype=autocast) if autocast is not None
            else contextlib.nullcontext())
    with cast:
        features = net.backbone(batch.tensors)
        proposals, _ = net.rpn(batch, features)
        found, _ = net.roi_heads(features, proposals, batch.image_sizes)
    out = []
    for det, resized, original in zip(found, batch.image_sizes, sizes):
        out.append({
            "boxes": resize_boxes(det["boxes"].float(), resized, original),
            "labels": det["labels"],
            "scores": det["scores"].float(),
            "masks": det["masks"][:, 0].float(),
        })
    return out
