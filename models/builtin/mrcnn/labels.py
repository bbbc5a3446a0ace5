"""Class labels on the visualisation: small text patches pasted after the GPU work.

A label is a few hundred pixels: glyphs are set on the host (Pillow's built-in font) and cached,
then pasted by the I/O thread that writes the frame, into host planes or, where the worker
compresses on the GPU, into the device planes (each patch uploaded once and cached there).
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

    Cached: a shot repeats the same few hundred labels, and one paste per label keeps the I/O
    threads' Python work (and so their hold on the GIL) small.
    """
    cover = text_coverage(text, font_scale)[:, :, None]
    patch = (BACKGROUND * (1 - cover) + TEXT * cover).astype(dtype)
    patch.flags.writeable = False  # shared by every frame that shows this label
    return patch


@lru_cache(maxsize=2048)
def _device_patch(text: str, font_scale: float, dtype: str, device: str) -> Any:
    import torch

    return torch.from_numpy(np.array(label_patch(text, font_scale, dtype))).to(device)  # a blocking copy


def draw_labels(rgb: Any, detections: list[dict], font_scale: float) -> None:
    """Draw ``label score`` for each detection onto the H x W x 3 scene-linear image, in place: a
    numpy array or a torch tensor on any device (drawn on the calling thread's stream)."""
    height, width = rgb.shape[:2]
    on_device = not isinstance(rgb, np.ndarray)
    dtype = str(rgb.dtype).removeprefix("torch.")
    for det in detections:
        text = f"{det['label']} {det['score']:.2f}"
        if on_device:
            patch = _device_patch(text, float(font_scale), dtype, str(rgb.device))
            if patch.is_cuda:  # cached across threads: its memory must outlive this stream's use of it
                import torch

                patch.record_stream(torch.cuda.current_stream())
        else:
            patch = label_patch(text, float(font_scale), dtype)
        h = patch.shape[0]
        x0 = min(max(0, round(det["box"][0])), max(0, width - 1))
        y0 = round(det["box"][1]) - h
        y0 = min(max(0, y0 if y0 >= 0 else round(det["box"][1])), max(0, height - 1))
        patch = patch[: height - y0, : width - x0]
        rgb[y0: y0 + patch.shape[0], x0: x0 + patch.shape[1]] = patch
