"""From SAM 2's per-object masks to the planes and sidecar a compositor uses.

Per frame, one EXR: ``rgba`` (the plate with each object tinted, alpha the union matte),
``matte.A`` (the union), ``instance.id`` (the object's id at each pixel, 0 for background, the same
id through the whole shot) and ``<name>.A`` for each named object (its own matte, overlaps kept, so
a Shuffle takes one object out). Where objects overlap, ``instance.id`` takes the object whose mask
logit is highest there; ``matte.A`` is exactly ``instance.id > 0``.

The sidecar lists every object of the job on every frame, present or not, with its box, pixel
count, presence score and SAM 2's own IoU estimate: an object that left the frame is there as absent.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

#: How strongly an object's tint shows over the plate in the rgba preview.
TINT = 0.5


def object_colour(object_id: int) -> tuple[float, float, float]:
    """A bright colour per object id, the same on every frame and in every job (golden-angle hues)."""
    return colorsys.hsv_to_rgb((object_id * 0.618033988749895) % 1.0, 0.75, 1.0)


def instance_ids(logits: Any, object_ids: Sequence[int]) -> Any:
    """``(H, W)`` float ids from ``(objects, H, W)`` mask logits: the highest positive logit wins."""
    import torch

    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[1:], dtype=torch.float32, device=logits.device)
    ids = torch.as_tensor(list(object_ids), dtype=torch.float32, device=logits.device)
    best, index = logits.float().max(dim=0)
    return torch.where(best > 0, ids[index], torch.zeros((), device=logits.device))


def compose(plate: Any, logits: Any, object_ids: Sequence[int], names: Mapping[int, str],
            all_objects: Sequence[int]) -> dict[str, Any]:
    """The planes of one frame as ``(H, W, C)`` float32 tensors keyed by plane name.

    ``plate``: the scene-linear input (H, W, >=3); ``logits``: SAM 2's mask logits (objects, H, W) for
    ``object_ids``; ``all_objects``: every object of the job, so a named object absent from SAM 2's
    output still gets its (empty) plane.
    """
    import torch

    plate = torch.as_tensor(plate, device=logits.device).float()
    ids = instance_ids(logits, object_ids)
    matte = (ids > 0).float()
    rgb = plate[..., :3].clone()
    for oid in sorted(set(int(i) for i in object_ids)):
        colour = torch.tensor(object_colour(oid), device=rgb.device)
        where = (ids == oid)[..., None].float() * TINT
        rgb = rgb * (1 - where) + colour * where
    planes = {"rgba": torch.cat([rgb, matte[..., None]], dim=-1), "matte": matte[..., None],
              "instance": ids[..., None]}
    by_id = {int(oid): i for i, oid in enumerate(object_ids)}
    for oid in all_objects:
        if oid in names:
            own = (logits[by_id[oid]] > 0).float() if oid in by_id else torch.zeros_like(matte)
            planes[names[oid]] = own[..., None]
    return planes


def object_stats(logits: Any, scores: Any, ious: Sequence[Any]) -> Any:
    """Per object, on the device and without a sync: pixels, box x0, y0, x1, y1 (exclusive end), score
    and IoU (-1 where none), as an (objects, 7) float tensor, copied to the host with the planes."""
    import torch

    masks = logits > 0
    n, height, width = masks.shape
    rows, cols = masks.any(dim=2).float(), masks.any(dim=1).float()
    y0 = rows.argmax(dim=1)
    y1 = height - rows.flip(1).argmax(dim=1)
    x0 = cols.argmax(dim=1)
    x1 = width - cols.flip(1).argmax(dim=1)
    iou = torch.stack([torch.as_tensor(v if v is not None else -1.0, dtype=torch.float32, device=logits.device)
                       for v in ious]) if n else torch.zeros(0, device=logits.device)
    score = torch.as_tensor(scores, dtype=torch.float32, device=logits.device).flatten()
    return torch.stack([masks.flatten(1).sum(1).float(), x0.float(), y0.float(), x1.float(), y1.float(), score,
                        iou.float()], dim=1)


def sidecar(stats: Sequence[Sequence[float]], object_ids: Sequence[int], names: Mapping[int, str],
            all_objects: Sequence[int]) -> list[dict[str, Any]]:
    """One entry per object of the job (from ``object_stats`` rows on the host): id, name, present,
    box [x0, y0, x1, y1] (top-left origin, exclusive end), pixels, score, iou."""
    out = []
    by_id = {int(oid): i for i, oid in enumerate(object_ids)}
    for oid in sorted(all_objects):
        entry: dict[str, Any] = {"id": int(oid), "name": names.get(oid), "present": False, "box": None,
                                 "pixels": 0, "score": None, "iou": None}
        if oid in by_id:
            pixels, x0, y0, x1, y1, score, iou = stats[by_id[oid]]
            entry.update(pixels=int(pixels), present=pixels > 0, score=round(float(score), 4),
                         iou=None if iou < 0 else round(float(iou), 4))
            if pixels:
                entry["box"] = [int(x0), int(y0), int(x1), int(y1)]
        out.append(entry)
    return out


def objects_sidecar(logits: Any, object_ids: Sequence[int], scores: Any, ious: Sequence[Any],
                    names: Mapping[int, str], all_objects: Sequence[int]) -> list[dict[str, Any]]:
    """``sidecar`` of ``object_stats``, synchronously."""
    return sidecar(object_stats(logits, scores, ious).tolist(), object_ids, names, all_objects)
