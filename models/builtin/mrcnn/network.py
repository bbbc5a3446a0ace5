"""Building torchvision's Mask R-CNN from a weights file, and running it without its mask paste.

torchvision's ``forward`` ends by pasting every detection's mask into a full-frame float image
(N x H x W) with a Python loop; a script then copies all of them to the host. Here the network
stops at the heads: boxes, labels, scores and the small per-box mask probabilities stay on the
device and ``compose`` builds the planes from them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models import detection
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from .coco import NUM_CLASSES
from .weights import WeightsError, load_state_dict


def build(arch: str, weights: Path, fold: bool = True) -> torch.nn.Module:
    """The architecture with randomly initialised layers, then every tensor from ``weights`` (strict);
    with ``fold``, its batch norms folded into their convolutions (``fold_batch_norms``) and each
    convolution's ReLU (and residual sum) fused with it (``fuse_relus``)."""
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
        fuse_relus(net)
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


class ConvReLU(torch.nn.Module):
    """``relu(conv(x) + residual)``: on a GPU one cuDNN call (convolution, bias, sum and ReLU fused:
    ``torch.cudnn_convolution_relu`` and ``cudnn_convolution_add_relu``), elsewhere and under
    autocast (which does not cast those calls) the same steps one by one."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        if x.is_cuda and torch.backends.cudnn.enabled and not torch.is_autocast_enabled("cuda"):
            if residual is None:
                return torch.cudnn_convolution_relu(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
            return torch.cudnn_convolution_add_relu(x, c.weight, residual, 1.0, c.bias, c.stride, c.padding,
                                                    c.dilation, c.groups)
        out = c(x)
        return F.relu(out if residual is None else out + residual)


class FusedBottleneck(torch.nn.Module):
    """torchvision's ResNet ``Bottleneck`` with its norms folded: three fused calls instead of nine
    operations (three convolutions, their bias sums and ReLUs, and the residual sum)."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = ConvReLU(block.conv1), ConvReLU(block.conv2), ConvReLU(block.conv3)
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), identity)


def _folded(block: Bottleneck) -> bool:
    return all(isinstance(getattr(block, f"bn{i}"), torch.nn.Identity) for i in (1, 2, 3))


def fuse_relus(net: torch.nn.Module) -> int:
    """Fuse every convolution that a ReLU follows (after ``fold_batch_norms``); returns how many.

    Why: on a GPU worker each tensor operation hands the GIL back and waits to take it again, and
    after folding, ResNet-50's convolutions were each still three operations (convolution, bias,
    ReLU), plus a residual sum per block: ~45% of the network's kernels by count, and on an H100
    2.2 of its 7.0 GPU ms a 1080p frame went to those sums and ReLUs alone, each a pass over a
    full feature map (benchmarks/profile_mrcnn_gpu.py). Fused, cuDNN applies them as the
    convolution writes its output.

    Found where the order of the forward pass is certain: ResNet bottlenecks whose norms were
    folded, and a convolution followed by a ReLU (norms folded away between them) among the
    children of a ``Sequential`` (torchvision's conv-norm-activation blocks, the RPN and mask
    heads) or of the backbone's layer getter (the ResNet stem).
    """
    fused = 0
    for parent in list(net.modules()):
        if isinstance(parent, torch.nn.Sequential):
            for name, child in list(parent.named_children()):
                if isinstance(child, Bottleneck) and _folded(child):
                    setattr(parent, name, FusedBottleneck(child))
                    fused += 3
        if not isinstance(parent, (torch.nn.Sequential, IntermediateLayerGetter)):
            continue
        children = [(n, m) for n, m in parent.named_children() if not isinstance(m, torch.nn.Identity)]
        for (conv_name, conv), (relu_name, relu) in zip(children, children[1:]):
            if type(conv) is torch.nn.Conv2d and type(relu) is torch.nn.ReLU and conv.padding_mode == "zeros" \
                    and not isinstance(conv.padding, str):
                setattr(parent, conv_name, ConvReLU(conv))
                setattr(parent, relu_name, torch.nn.Identity())
                fused += 1
    return fused


def configured(net: Any, min_size: int, max_size: int, score_thresh: float, detections: int) -> torch.nn.Module:
    """``net`` set up for one set of options, without touching ``net``: a view that shares every
    weight with it and has its own transform (resize) and ROI heads (threshold, detections).

    Why a view: torchvision keeps these settings as attributes of its modules, and one warm
    network serves chunks of several jobs at once, each with its own options. Setting them on the
    shared network would let one job's threshold leak into another's batch.
    """
    view = copy.copy(net)
    view.__dict__["_modules"] = dict(net._modules)  # its own table of children; the children are shared
    transform = copy.copy(net.transform)
    transform.min_size = (int(min_size),)
    transform.max_size = int(max_size)
    roi_heads = copy.copy(net.roi_heads)
    roi_heads.score_thresh = float(score_thresh)
    roi_heads.detections_per_img = int(detections)
    view._modules["transform"] = transform
    view._modules["roi_heads"] = roi_heads
    return view


def _cast(device: torch.device, autocast: torch.dtype | None) -> Any:
    # No autocast cache: a CUDA graph cannot capture it, and the weights are cast once per call anyway.
    return (torch.autocast(device.type, dtype=autocast, cache_enabled=False) if autocast is not None
            else contextlib.nullcontext())


def _mean_std(transform: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform's normalisation as 3 x 1 x 1 tensors on ``device``, made once.

    Why not ``transform.normalize``: it makes them from Python lists on every call, a copy from
    host memory that a CUDA graph cannot capture.
    """
    made = transform.__dict__.setdefault("_mlfarm_mean_std", {})
    key = (device, dtype)
    if key not in made:
        made[key] = tuple(torch.as_tensor(v, dtype=dtype, device=device)[:, None, None]
                          for v in (transform.image_mean, transform.image_std))
    return made[key]


@dataclass
class Front:
    """What ``front`` gives ``heads``: the padded batch, the FPN's features, and the RPN's
    objectness logits (B*A x 1) and box deltas (B*A x 4) at every anchor, with the anchors (one
    A x 4 tensor per image), before any selection (whose sizes depend on the scores)."""

    batch: ImageList
    features: dict[str, torch.Tensor]
    objectness: torch.Tensor
    deltas: torch.Tensor
    anchors: list[torch.Tensor]
    anchors_per_level: list[int]


def front(net: Any, images: Sequence[torch.Tensor], channels_last: bool = False,
          autocast: torch.dtype | None = None) -> Front:
    """3 x H x W display-referred images in [0, 1] through every step whose shapes depend only on
    the input's: the transform (normalise, resize, pad), the backbone with its FPN, the RPN's head
    and its anchors. A CUDA graph can replay all of it (``models/cuda_graphs.py``)."""
    t = net.transform
    mean, std = _mean_std(t, images[0].device, images[0].dtype)
    resized = [t.resize((img - mean) / std)[0] for img in images]
    batch = ImageList(t.batch_images(resized, t.size_divisible), [tuple(r.shape[-2:]) for r in resized])
    if channels_last:
        batch.tensors = batch.tensors.contiguous(memory_format=torch.channels_last)
    with _cast(batch.tensors.device, autocast):
        features = net.backbone(batch.tensors)
        levels = list(features.values())
        objectness, deltas = net.rpn.head(levels)
        anchors = net.rpn.anchor_generator(batch, levels)
        per_level = [o[0].numel() for o in objectness]  # anchors x height x width of each level
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    return Front(batch, features, objectness, deltas, anchors, per_level)


def heads(net: Any, front: Front, sizes: list[tuple[int, int]], autocast: torch.dtype | None = None
          ) -> list[dict[str, torch.Tensor]]:
    """The proposals (decoding makes a tensor from a Python number, which a graph cannot
    capture) and their selection, then the box and mask heads: per image ``boxes`` (in the pixels
    of ``sizes``, the input's), ``labels``, ``scores`` and ``masks`` (N x 28 x 28 probabilities of
    the predicted class)."""
    image_sizes = front.batch.image_sizes
    rpn = net.rpn
    with _cast(front.deltas.device, autocast):
        proposals = rpn.box_coder.decode(front.deltas, front.anchors).view(len(front.anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, front.objectness, image_sizes, front.anchors_per_level)
        found, _ = net.roi_heads(front.features, boxes, image_sizes)
    out = []
    for det, resized, original in zip(found, image_sizes, sizes):
        out.append({
            "boxes": resize_boxes(det["boxes"].float(), resized, original),
            "labels": det["labels"],
            "scores": det["scores"].float(),
            "masks": det["masks"][:, 0].float(),
        })
    return out


def run(net: Any, images: list[torch.Tensor], channels_last: bool = False,
        autocast: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """3 x H x W display-referred images in [0, 1] (of any sizes) to their detections: ``front``
    then ``heads``, eagerly."""
    return heads(net, front(net, images, channels_last, autocast), [tuple(img.shape[-2:]) for img in images],
                 autocast)
