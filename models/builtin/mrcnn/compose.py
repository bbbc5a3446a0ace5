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


def pad_detections(dets: list[dict[str, torch.Tensor]], picks: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The picked detections of B frames (float boxes, scores and masks, as ``network.run`` gives
    them) as B x N tensors, N the most any frame kept: boxes, labels, scores, masks and ``valid``
    (False where a frame had fewer). Padding has empty boxes and masks, so it pastes to nothing;
    ``valid`` keeps it out of what draws from boxes alone."""
    pad = torch.nn.utils.rnn.pad_sequence
    boxes, labels, scores, masks = (pad([d[key][i] for d, i in zip(dets, picks)], batch_first=True)
                                    for key in ("boxes", "labels", "scores", "masks"))
    counts = torch.tensor([len(i) for i in picks], device=boxes.device)
    valid = torch.arange(boxes.shape[1], device=boxes.device)[None] < counts[:, None]
    return boxes, labels, scores, masks, valid


def instance_ids(masks: torch.Tensor) -> torch.Tensor:
    """... x N x H x W booleans (ranked best first) to ... x H x W int32: 0 background, else the best id."""
    n = masks.shape[-3]
    if n == 0:
        return torch.zeros(masks.shape[:-3] + masks.shape[-2:], dtype=torch.int32, device=masks.device)
    ranks = torch.arange(1, n + 1, dtype=torch.int32, device=masks.device).view(n, 1, 1)
    ids = torch.where(masks, ranks, torch.tensor(n + 1, dtype=torch.int32, device=masks.device)).amin(-3)
    return torch.where(ids > n, torch.zeros_like(ids), ids)


def visible_pixels(ids: torch.Tensor, n: int) -> torch.Tensor:
    """... x N: how many pixels of ... x H x W ``ids`` each of the ids 1..N owns (no device sync).

    One comparison per id and a sum, not a scatter: a scatter-add of every pixel into N + 1
    counters makes the GPU's atomics queue on a handful of addresses, and was the costliest
    kernel of composing (1.3 of 2.8 GPU ms a 1080p frame on an H100, benchmarks/profile_mrcnn_gpu.py).
    The N x H x W booleans are a quarter of the float masks pasted just before.
    """
    ranks = torch.arange(1, n + 1, dtype=ids.dtype, device=ids.device).view(n, 1, 1)
    return (ids.unsqueeze(-3) == ranks).sum((-2, -1))


def lookup_planes(ids: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``matte`` (1 where any kept instance), ``class.id`` and ``score`` planes (float) from the
    ... x H x W id plane and the ... x N labels and scores of its instances."""
    zero = torch.zeros(ids.shape[:-2] + (1,), device=ids.device, dtype=torch.float32)
    class_of = torch.cat([zero, labels.float()], -1)
    score_of = torch.cat([zero, scores.float()], -1)
    index = ids.long().flatten(-2)
    return ((ids > 0).float(), torch.gather(class_of, -1, index).view(ids.shape),
            torch.gather(score_of, -1, index).view(ids.shape))


def border_mask(ids: torch.Tensor, thickness: int) -> torch.Tensor:
    """Pixels of an instance within ``thickness`` pixels of a pixel with another id (background
    included), for ... x H x W ids."""
    f = ids.float().reshape(-1, 1, *ids.shape[-2:])
    k = 2 * int(thickness) + 1
    hi = F.max_pool2d(f, k, stride=1, padding=int(thickness)).view(ids.shape)
    lo = -F.max_pool2d(-f, k, stride=1, padding=int(thickness)).view(ids.shape)
    f = f.view(ids.shape)
    return (ids > 0) & ((hi != f) | (lo != f))


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Float boxes (x0, y0, x1, y1) to inclusive pixel bounds, clipped to the frame."""
    b = boxes.float().round().long()
    x0, y0 = b[..., 0].clamp(0, width - 1), b[..., 1].clamp(0, height - 1)
    x1, y1 = (b[..., 2] - 1).clamp(0, width - 1), (b[..., 3] - 1).clamp(0, height - 1)
    return torch.stack([x0, y0, torch.maximum(x1, x0), torch.maximum(y1, y0)], -1)


def box_outlines(boxes: torch.Tensor, height: int, width: int, thickness: int,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """... x H x W: the union of the ... x N boxes' outlines (those ``valid``), ``thickness`` pixels
    wide, drawn inside each box.

    A pixel is on box k's outline when its row is inside the box and its column on the box's
    left or right band, or its column inside and its row on the top or bottom band: each term is
    an outer product of a row and a column indicator, so the union over boxes is two matrix
    products of N x H by N x W, never an N x H x W tensor.
    """
    lead = boxes.shape[:-2]
    if boxes.shape[-2] == 0:
        return torch.zeros(lead + (height, width), dtype=torch.bool, device=boxes.device)
    b = pixel_boxes(boxes, height, width)
    t = int(thickness)
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    in_y = (ys >= b[..., 1:2]) & (ys <= b[..., 3:4])  # ... x N x H
    in_x = (xs >= b[..., 0:1]) & (xs <= b[..., 2:3])  # ... x N x W
    band_y = in_y & ~((ys >= b[..., 1:2] + t) & (ys <= b[..., 3:4] - t))
    band_x = in_x & ~((xs >= b[..., 0:1] + t) & (xs <= b[..., 2:3] - t))
    if valid is not None:
        in_y, band_y = in_y & valid[..., None], band_y & valid[..., None]
    hits = band_y.float().transpose(-1, -2) @ in_x.float() + in_y.float().transpose(-1, -2) @ band_x.float()
    return hits > 0


def visualise(image: torch.Tensor, ids: torch.Tensor, boxes: torch.Tensor, alpha: float, show_border: bool,
              border_thick: int, show_box: bool, bbox_thick: int, colours: torch.Tensor,
              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's picture on ... x H x W x 3 display-referred images: instances tinted with their
    colour at ``alpha``, white borders, green boxes (those ``valid``). Returns the picture and
    where it differs from the input."""
    fg = ids > 0
    tint = colours[(ids.long() - 1).clamp(min=0) % colours.shape[0]]
    out = torch.where(fg[..., None], image * (1 - alpha) + tint * alpha, image)
    changed = fg.clone()
    height, width = ids.shape[-2:]
    for show, mask, colour in ((show_border, lambda: border_mask(ids, border_thick), BORDER_SRGB),
                               (show_box, lambda: box_outlines(boxes, height, width, bbox_thick, valid), BOX_SRGB)):
        if show:
            m = mask()
            out = torch.where(m[..., None], torch.tensor(colour, device=out.device, dtype=out.dtype), out)
            changed |= m
    return out, changed
