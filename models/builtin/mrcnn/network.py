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
from torchvision.ops.misc import FrozenBatchNorm2d

from .coco import NUM_CLASSES
from .weights import WeightsError, load_state_dict


def build(arch: str, weights: Path, fold: bool = True) -> torch.nn.Module:
    """The architecture with randomly initialised layers, then every tensor from ``weights`` (strict);
    with ``fold``, its batch norms folded into their convolutions (``fold_batch_norms``)."""
    net = getattr(detection, arch)(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    state = load_state_dict(weights, torch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise WeightsError(f"{weights} does not fit {arch}: {' '.join(first)[:400]}") from None
    net.eval()
    if fold:
        fold_batch_norms(net)
    return net


_NORMS = (FrozenBatchNorm2d, torch.nn.BatchNorm2d)


def _fold(conv: torch.nn.Conv2d, norm: torch.nn.Module) -> None:
    """conv then norm, as one convolution: y = (conv(x) - mean) * w / sqrt(var + eps) + b."""
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        conv.bias = torch.nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)


def fold_batch_norms(net: torch.nn.Module) -> int:
    """Fold every inference-time batch norm into the convolution it follows; returns how many.

    Why: torchvision's ResNet backbone runs a ``FrozenBatchNorm2d`` after each of its 53
    convolutions, and each is about ten small tensor operations in Python. On a GPU worker every
    operation hands the GIL back and waits to take it again while the I/O threads work, so those
    ~500 operations a batch were much of the time the thread feeding the GPU spent waiting
    (profiled on an H100); on the GPU each also made two passes over a full feature map. Folded,
    the network computes the same function with none of them.

    Pairs are found where the order of the forward pass is certain: adjacent modules of a
    ``Sequential`` (torchvision's downsample branches and the v2 heads' conv-norm blocks), and
    ``convN``/``bnN`` attributes of torchvision's ResNet stem and blocks, which call each conv's
    norm straight after it.
    """
    folded = 0
    for parent in list(net.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, torch.nn.Sequential):
            names = list(children)
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(name, "bn" + name[4:]) for name in children if name.startswith("conv")]
        for conv_name, norm_name in pairs:
            conv, norm = children.get(conv_name), children.get(norm_name)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, _NORMS) and not norm.training:
                _fold(conv, norm)
                setattr(parent, norm_name, torch.nn.Identity())
                folded += 1
    return folded


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
