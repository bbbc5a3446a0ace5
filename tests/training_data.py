"""Small synthetic training sets, written as real image files (EXR and PNG through OpenImageIO).

img2img learns a fixed colour transform (per-channel gain and offset); classify tells warm
(red-dominant) images from cool (blue-dominant) ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from conftest import write_exr

GAIN = np.array([0.6, 0.9, 1.2], np.float32)
OFFSET = np.array([0.05, 0.0, -0.02], np.float32)


def colour_transform(rgb: np.ndarray) -> np.ndarray:
    return rgb * GAIN + OFFSET


def textured(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth gradients plus noise, values in [0, 0.8]: something for convolutions to see."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / (5 + 3 * c) + rng.random() * 6) * np.cos(y / (7 + 2 * c)) for c in range(3)], axis=2)
    img = 0.4 + 0.25 * base + 0.15 * (rng.random((height, width, 3), dtype=np.float32) - 0.5)
    return np.clip(img, 0.0, 0.8).astype(np.float32)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, c = pixels.shape
    out = oiio.ImageOutput.create(str(path))
    assert out.open(str(path), oiio.ImageSpec(w, h, c, oiio.UINT8)), oiio.geterror()
    assert out.write_image(np.clip(pixels, 0, 1).astype(np.float32))
    out.close()


def make_img2img_data(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (72, 80)) -> Path:
    """train/ inputs as PNG and ground truths as EXR (matched by name across formats); val/ all EXR."""
    h, w = size
    for i in range(n_train):
        img = textured(100 + i, h, w)
        write_png(root / "train" / "input" / f"shot_{i:02d}.png", img)
        quantised = np.round(img * 255) / 255  # what the PNG holds
        write_exr(root / "train" / "groundtruth" / f"shot_{i:02d}.exr", colour_transform(quantised))
    for i in range(n_val):
        img = textured(200 + i, h, w)
        write_exr(root / "val" / "input" / f"val_{i:02d}.exr", img)
        write_exr(root / "val" / "groundtruth" / f"val_{i:02d}.exr", colour_transform(img))
    return root


def warm_or_cool(seed: int, warm: bool, size: int = 72) -> np.ndarray:
    img = textured(seed, size, size) * 0.5
    img[..., 0 if warm else 2] += 0.45
    return img


def make_classify_data(root: Path, per_class: int = 4, n_val: int = 1) -> Path:
    for split, n, offset in (("train", per_class, 300), ("val", n_val, 400)):
        for k in range(n):
            write_exr(root / split / "warm" / f"w{k}.exr", warm_or_cool(offset + k, True))
            write_png(root / split / "cool" / f"c{k}.png", warm_or_cool(offset + 50 + k, False))
    return root
