"""Training data: finding the images of a data folder, checking them, and drawing random crops.

A data folder is checked from the image headers alone before anything is queued (the CLI does it)
and again by the trainer, so a missing ground truth, a pair of different sizes or an image smaller
than the crop is one clear error naming the file(s), not a crash an hour into a run.

Layouts (any of EXR, PNG, JPEG, TIFF, read through OpenImageIO)::

    img2img:  train/input/NAME.ext  train/groundtruth/NAME.ext   [val/input/  val/groundtruth/]
    classify: train/CLASS/*.ext     (one folder per class)       [val/CLASS/]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

from mlfarm.exr.io import FrameError, read_image

IMAGE_EXTENSIONS = (".exr", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
CHANNELS = 3  # the networks see RGB; alpha, where there is one, passes through at inference


class DataError(ValueError):
    """A data folder that cannot be trained on; the message names the file(s) and what is wrong."""


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int
    height: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass
class Sample:
    """One training item: an input image and either its ground truth (img2img) or its label (classify)."""

    image: ImageInfo
    target: ImageInfo | None = None
    label: int = -1


@dataclass
class DataSet:
    template: str
    train: list[Sample]
    val: list[Sample] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def image_info(path: Path) -> ImageInfo:
    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        raise DataError(f"{path}: not a readable image ({oiio.geterror() or 'unknown format'})")
    try:
        spec = inp.spec()
        return ImageInfo(path, spec.width, spec.height)
    finally:
        inp.close()


def _images(folder: Path) -> list[Path]:
    return sorted(folder / n for n in os.listdir(folder)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                  and (folder / n).is_file())


def _by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in _images(folder):
        if path.stem in out:
            raise DataError(f"{out[path.stem]} and {path}: two images named {path.stem!r} in one folder; "
                            "pairs are matched by name, so names must be unique")
        out[path.stem] = path
    return out


def _check_crop(info: ImageInfo, crop: int) -> ImageInfo:
    if info.width < crop or info.height < crop:
        raise DataError(f"{info.path} is {info.size}, smaller than the {crop}x{crop} crop "
                        f"(use a smaller --crop or remove the image)")
    return info


def _pairs(split: Path, crop: int) -> list[Sample]:
    inputs, truths = split / "input", split / "groundtruth"
    for folder in (inputs, truths):
        if not folder.is_dir():
            raise DataError(f"{folder}: missing (img2img data holds {split.name}/input/ and {split.name}/groundtruth/)")
    a, b = _by_stem(inputs), _by_stem(truths)
    lonely = [f"{a[s]} has no ground truth in {truths}" for s in sorted(set(a) - set(b))]
    lonely += [f"{b[s]} has no input in {inputs}" for s in sorted(set(b) - set(a))]
    if lonely:
        more = f" (and {len(lonely) - 3} more)" if len(lonely) > 3 else ""
        raise DataError("; ".join(lonely[:3]) + more + ": pairs are matched by file name, extension aside")
    samples = []
    for stem in sorted(a):
        inp, gt = image_info(a[stem]), image_info(b[stem])
        if (inp.width, inp.height) != (gt.width, gt.height):
            raise DataError(f"{inp.path} is {inp.size} but {gt.path} is {gt.size}: "
                            "an input and its ground truth must be the same size")
        samples.append(Sample(_check_crop(inp, crop), _check_crop(gt, crop)))
    return samples


def _classes(split: Path, crop: int, classes: Sequence[str] | None) -> tuple[list[Sample], list[str]]:
    folders = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = folders
        if len(classes) < 2:
            raise DataError(f"{split}: classify needs one folder per class and at least two classes "
                            f"(found {', '.join(classes) or 'none'})")
    else:
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DataError(f"{split / unknown[0]}: class {unknown[0]!r} has no training folder "
                            f"(classes: {', '.join(classes)})")
    samples = []
    for label, name in enumerate(classes):
        if not (split / name).is_dir():
            continue
        images = _images(split / name)
        if not images and split.name == "train":
            raise DataError(f"{split / name}: no images (EXR, PNG, JPEG or TIFF) for class {name!r}")
        samples.extend(Sample(_check_crop(image_info(p), crop), label=label) for p in images)
    return samples, list(classes)


def scan(data_dir: str | os.PathLike[str], template: str, crop: int) -> DataSet:
    """Check a data folder from image headers only; every problem is a DataError naming the file(s)."""
    root = Path(data_dir)
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root}: no train/ folder (see `mlfarm train --help` for the layout)")
    val = root / "val"
    if template == "img2img":
        samples = _pairs(train, crop)
        if not samples:
            raise DataError(f"{train / 'input'}: no images (EXR, PNG, JPEG or TIFF)")
        return DataSet(template, samples, _pairs(val, crop) if val.is_dir() else [])
    if template == "classify":
        samples, classes = _classes(train, crop, None)
        val_samples = _classes(val, crop, classes)[0] if val.is_dir() else []
        return DataSet(template, samples, val_samples, classes)
    raise DataError(f"unknown template {template!r}")


def load_rgb(info: ImageInfo) -> np.ndarray:
    """An image as C x H x W float32 RGB (grey repeated), the layout the networks take."""
    try:
        pixels = read_image(str(info.path)).rgba(CHANNELS)
    except FrameError as exc:
        raise DataError(str(exc)) from None
    if pixels.shape[:2] != (info.height, info.width):
        raise DataError(f"{info.path} changed while training was starting (now {pixels.shape[1]}x{pixels.shape[0]})")
    if pixels.shape[2] < CHANNELS:
        pixels = np.repeat(pixels[:, :, :1], CHANNELS, axis=2)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass(frozen=True)
class Crop:
    index: int
    y: int
    x: int
    flip: bool


def epoch_batches(sizes: Sequence[tuple[int, int]], crop: int, batch: int, crops_per_image: int, seed: int,
                  epoch: int) -> list[list[Crop]]:
    """The crops of one epoch, in batches: a pure function of (seed, epoch).

    Deriving every epoch's order, offsets and flips from the seed and the epoch number alone means a
    run resumed from a checkpoint in the middle of an epoch draws exactly the batches an
    uninterrupted run would have, which keeps resumed runs reproducible.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(np.repeat(np.arange(len(sizes)), crops_per_image))
    u = rng.random((len(order), 2))
    flips = rng.random(len(order)) < 0.5
    crops = []
    for i, idx in enumerate(order):
        h, w = sizes[idx]
        crops.append(Crop(int(idx), int(u[i, 0] * (h - crop + 1)), int(u[i, 1] * (w - crop + 1)), bool(flips[i])))
    return [crops[i:i + batch] for i in range(0, len(crops), batch)]


def steps_per_epoch(n_samples: int, batch: int, crops_per_image: int) -> int:
    return -(-n_samples * crops_per_image // batch)


def centre_crop(size: tuple[int, int], crop: int) -> tuple[int, int]:
    h, w = size
    return (h - crop) // 2, (w - crop) // 2
