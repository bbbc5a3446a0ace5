"""Turning detections into image planes, on whatever device the tensors live on (GPU in production).

Everything here is a pure function of the detections and the frame, so the tests can check each
plane exactly against detections they construct. Instances are ranked by score (id 1 is the best);
where instances overlap, the better-scoring one owns the pixel in every plane, so ``instance.id``,
``class.id``, ``score``, the tint in ``rgba`` and the borders all agree.
"""

from __future__ import annotations

import colorsys
from collections.abc import Collection

import numpy as np
import torch
import torch.nn.functional as F

BORDER_SRGB = (1.0, 1.0, 1.0)  # as the seed drew mask borders: white
BOX_SRGB = (0.0, 1.0, 0.0)  # and boxes: green


def palette(n: int = 32) -> np.ndarray:
    """``n`` well-separated sRGB colours (golden-ratio hues), instance ``i`` gets ``palette[(i-1) % n]``."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 0.95) for h in hues], dtype=np.float32)


def select(scores: torch.Tensor, labels: torch.Tensor, thresh: float, classes: Collection[int] | None,
           max_detections: int) -> torch.Tensor:
    """Indices of the detections to keep, best score first (ties keep their order): the instance ids - 1."""
    keep = scores >= thresh
    if classes is not None:
        wanted = torch.tensor(sorted(classes), dtype=labels.dtype, device=labels.device)
        keep &= torch.isin(labels, wanted)
    idx = torch.nonzero(keep).flatten()
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    return idx[order][:max_detections]


def _interpolation(lo: torch.Tensor, hi: torch.Tensor, size: int, cells: int) -> torch.Tensor:
    """N x size x cells bilinear weights mapping ``cells`` mask cells spread over [lo, hi) to pixels.

    Pixels whose centre lies outside [lo, hi) get no weight (they stay 0); inside, sampling is
    bilinear with edge clamping, as ``F.interpolate(align_corners=False)`` samples.
    """
    centres = torch.arange(size, device=lo.device, dtype=torch.float32) + 0.5
    span = (hi - lo).clamp(min=1e-6)
    u = (centres[None] - lo[:, None]) / span[:, None] * cells - 0.5
    inside = (centres[None] >= lo[:, None]) & (centres[None] < hi[:, None])
    u = u.clamp(0, cells - 1)
    i0 = u.floor().long()
    frac = u - i0
    i1 = (i0 + 1).clamp(max=cells - 1)
    weights = torch.zeros(lo.shape[0], size, cells, device=lo.device, dtype=torch.float32)
    weights.scatter_add_(2, i0[..., None], (1 - frac)[..., None])
    weights.scatter_add_(2, i1[..., None], frac[..., None])
    return weights * inside[..., None]


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x M x M box-relative mask probabilities to N x height x width full-frame probabilities.

    Like torchvision's paste (the mask gets a one-cell zero border and the box grows to match, so
    masks fade out at the box edge), but as two batched matrix products instead of a Python loop
    over instances: a bilinear resize is separable, ``rows @ mask @ cols^T``.
    """
    n, m = masks.shape[0], masks.shape[-1]
    if n == 0:
        return torch.zeros(0, height, width, device=masks.device, dtype=torch.float32)
    padded = F.pad(masks.float(), (1, 1, 1, 1))
    scale = (m + 2) / m
    b = boxes.float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    hw, hh = (b[:, 2] - b[:, 0]) / 2 * scale, (b[:, 3] - b[:, 1]) / 2 * scale
    rows = _interpolation(cy - hh, cy + hh, height, m + 2)  # N x H x (M+2)
    cols = _interpolation(cx - hw, cx + hw, width, m + 2)  # N x W x (M+2)
    return torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2))


def instance_ids(masks: torch.Tensor) -> torch.Tensor:
    """N x H x W booleans (ranked best first) to an H x W int32 plane: 0 background, else the best id."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(h, w, dtype=torch.int32, device=masks.device)
    ranks = torch.arange(1, n + 1, dtype=torch.int32, device=masks.device).view(n, 1, 1)
    ids = torch.where(masks, ranks, torch.tensor(n + 1, dtype=torch.int32, device=masks.device)).amin(0)
    return torch.where(ids > n, torch.zeros_like(ids), ids)


def lookup_planes(ids: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``matte`` (1 where any kept instance), ``class.id`` and ``score`` planes (float) from the id plane."""
    zero = torch.zeros(1, device=ids.device, dtype=torch.float32)
    class_of = torch.cat([zero, labels.float()])
    score_of = torch.cat([zero, scores.float()])
    index = ids.long()
    return (ids > 0).float(), class_of[index], score_of[index]


def border_mask(ids: torch.Tensor, thickness: int) -> torch.Tensor:
    """Pixels of an instance within ``thickness`` pixels of a pixel with another id (background included)."""
    f = ids.float()[None, None]
    k = 2 * int(thickness) + 1
    hi = F.max_pool2d(f, k, stride=1, padding=int(thickness))[0, 0]
    lo = -F.max_pool2d(-f, k, stride=1, padding=int(thickness))[0, 0]
    return (ids > 0) & ((hi != f[0, 0]) | (lo != f[0, 0]))


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Float boxes (x0, y0, x1, y1) to inclusive pixel bounds, clipped to the frame."""
    b = boxes.float().round().long()
    x0, y0 = b[:, 0].clamp(0, width - 1), b[:, 1].clamp(0, height - 1)
    x1, y1 = (b[:, 2] - 1).clamp(0, width - 1), (b[:, 3] - 1).clamp(0, height - 1)
    return torch.stack([x0, y0, torch.maximum(x1, x0), torch.maximum(y1, y0)], 1)


def box_outlines(boxes: torch.Tensor, height: int, width: int, thickness: int) -> torch.Tensor:
    """H x W: the union of every box's outline, ``thickness`` pixels wide, drawn inside the box."""
    if boxes.shape[0] == 0:
        return torch.zeros(height, width, dtype=torch.bool, device=boxes.device)
    b = pixel_boxes(boxes, height, width)
    t = int(thickness)
    ys = torch.arange(height, device=boxes.device)[None]
    xs = torch.arange(width, device=boxes.device)[None]
    in_y = (ys >= b[:, 1:2]) & (ys <= b[:, 3:4])
    in_x = (xs >= b[:, 0:1]) & (xs <= b[:, 2:3])
    core_y = (ys >= b[:, 1:2] + t) & (ys <= b[:, 3:4] - t)
    core_x = (xs >= b[:, 0:1] + t) & (xs <= b[:, 2:3] - t)
    outline = (in_y[:, :, None] & in_x[:, None, :]) & ~(core_y[:, :, None] & core_x[:, None, :])
    return outline.any(0)


def visualise(image: torch.Tensor, ids: torch.Tensor, boxes: torch.Tensor, alpha: float, show_border: bool,
              border_thick: int, show_box: bool, bbox_thick: int, colours: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's picture on an H x W x 3 display-referred image: instances tinted with their colour at
    ``alpha``, white borders, green boxes. Returns the picture and where it differs from the input."""
    fg = ids > 0
    tint = colours[(ids.long() - 1).clamp(min=0) % colours.shape[0]]
    out = torch.where(fg[..., None], image * (1 - alpha) + tint * alpha, image)
    changed = fg.clone()
    for show, mask, colour in ((show_border, lambda: border_mask(ids, border_thick), BORDER_SRGB),
                               (show_box, lambda: box_outlines(boxes, *ids.shape, bbox_thick), BOX_SRGB)):
        if show:
            m = mask()
            out = torch.where(m[..., None], torch.tensor(colour, device=out.device, dtype=out.dtype), out)
            changed |= m
    return out, changed
