"""Class labels on the visualisation: small text patches pasted after the GPU work.

A label is a few hundred pixels: glyphs are set on the host (Pillow's built-in font) and cached,
then written by the I/O thread that writes the frame, all of a frame's labels in one indexed
write: into host planes or, where the worker compresses on the GPU, into the device planes.
As the seed drew them: green background above the box's top-left corner, grey text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mlfarm.models.colour import srgb_to_linear

BACKGROUND = srgb_to_linear(np.array([0.0, 1.0, 0.0], dtype=np.float32), np)
TEXT = srgb_to_linear(np.array([0.86, 0.86, 0.86], dtype=np.float32), np)


@lru_cache(maxsize=8)
def _font(pixels: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=pixels)


@lru_cache(maxsize=512)
def text_coverage(text: str, font_scale: float) -> np.ndarray:
    """h x w coverage in [0, 1] of ``text`` set at the seed's ``font_scale`` (0.35: about 11 pixels)."""
    font = _font(max(6, round(30 * font_scale)))
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, right - left + 2), max(1, bottom - top + 2)), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, fill=255, font=font)
    return np.asarray(canvas, dtype=np.float32) / 255.0


@lru_cache(maxsize=2048)
def label_patch(text: str, font_scale: float, dtype: str = "float32") -> np.ndarray:
    """h x w x 3 scene-linear pixels of one label, text over its background, ready to paste.

    Cached: a shot repeats the same few hundred labels, so setting text is rare.
    """
    cover = text_coverage(text, font_scale)[:, :, None]
    patch = (BACKGROUND * (1 - cover) + TEXT * cover).astype(dtype)
    patch.flags.writeable = False  # shared by every frame that shows this label
    return patch


@lru_cache(maxsize=512)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every pixel of an h x w patch, flattened: patches repeat, so do their grids."""
    r, c = np.indices((h, w))
    r, c = r.ravel(), c.ravel()
    r.flags.writeable = c.flags.writeable = False  # shared by every frame
    return r, c


def label_pixels(detections: list[dict], font_scale: float, height: int, width: int, dtype: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the labels of ``detections`` land: rows, columns and N x 3 values, each pixel once,
    showing the last label drawn over it (as pasting them one after another would).

    Computed on the host from the cached patches, so that drawing into a frame is one indexed
    write, whatever the number of labels: on the GPU two small uploads and one kernel, instead
    of a few tensor operations per label, each taking the GIL from the thread feeding the network.
    """
    rows, cols, values = [], [], []
    for det in detections:
        patch = label_patch(f"{det['label']} {det['score']:.2f}", float(font_scale), dtype)
        h = patch.shape[0]
        x0 = min(max(0, round(det["box"][0])), max(0, width - 1))
        y0 = round(det["box"][1]) - h
        y0 = min(max(0, y0 if y0 >= 0 else round(det["box"][1])), max(0, height - 1))
        patch = patch[: height - y0, : width - x0]
        r, c = _grid(*patch.shape[:2])
        rows.append(r + y0)
        cols.append(c + x0)
        values.append(patch.reshape(-1, 3))
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 3), dtype)
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(values)
    _, last = np.unique((r * width + c)[::-1], return_index=True)  # each pixel's last write
    keep = len(r) - 1 - last
    return r[keep], c[keep], v[keep]


def draw_labels(rgb: Any, detections: list[dict], font_scale: float) -> None:
    """Draw ``label score`` for each detection onto the H x W x 3 scene-linear image, in place: a
    numpy array or a torch tensor on any device (drawn on the calling thread's stream)."""
    height, width = rgb.shape[:2]
    rows, cols, values = label_pixels(detections, font_scale, height, width, str(rgb.dtype).removeprefix("torch."))
    if not len(rows):
        return
    if isinstance(rgb, np.ndarray):
        rgb[rows, cols] = values
        return
    import torch

    where = torch.from_numpy(np.stack([rows, cols]))
    values = torch.from_numpy(values)
    if rgb.is_cuda:  # pinned, so the uploads queue on the stream instead of stopping this thread
        where, values = where.pin_memory(), values.pin_memory()
    where = where.to(rgb.device, non_blocking=True)
    rgb[where[0], where[1]] = values.to(rgb.device, non_blocking=True)
