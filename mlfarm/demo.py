"""``mlfarm demo``: the whole path on a fresh machine, ending in a picture a person can look at."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import OpenImageIO as oiio
from rich.console import Console

from mlfarm.broker.connection import NoBrokerError, broker_url
from mlfarm.exr.io import FrameError, read_image
from mlfarm.local_farm import LocalFarm
from mlfarm.models.colour import linear_to_srgb
from mlfarm.settings import Settings

log = logging.getLogger(__name__)


def synthetic_frame(frame: int, width: int, height: int) -> np.ndarray:
    """A scene-linear RGBA frame: a gradient sky, a moving bright disc and a hard-edged grid."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    img = np.zeros((height, width, 4), np.float32)
    img[..., 0] = 0.05 + 0.3 * u
    img[..., 1] = 0.08 + 0.2 * (1 - v)
    img[..., 2] = 0.25 + 0.4 * (1 - v)
    grid = ((x // 24 + y // 24) % 2 == 0) & (v > 0.7)
    img[grid, :3] = (0.6, 0.55, 0.5)
    cx, cy = width * (0.2 + 0.6 * ((frame % 24) / 23)), height * 0.4
    disc = (x - cx) ** 2 + (y - cy) ** 2 < (height * 0.15) ** 2
    img[disc, :3] = (4.0, 2.5, 0.8)  # HDR highlight: values above 1 must survive the blur
    img[..., 3] = 1.0
    return img


def write_plate(pattern_dir: Path, first: int, count: int, width: int, height: int) -> str:
    pattern_dir.mkdir(parents=True, exist_ok=True)
    for f in range(first, first + count):
        img = synthetic_frame(f, width, height)
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.attribute("compression", "zip")
        out = oiio.ImageOutput.create(str(pattern_dir / f"plate.{f:04d}.exr"))
        out.open(str(pattern_dir / f"plate.{f:04d}.exr"), spec)
        out.write_image(img)
        out.close()
    return str(pattern_dir / "plate.####.exr")


def viewable(path: str) -> np.ndarray:
    """A frame's colour as H x W x 3: its RGB, or for outputs of data planes only (flow), the first
    plane's channels as grey levels side by side in the red, green, blue slots."""
    image = read_image(path)
    try:
        return image.rgba(3)
    except FrameError:
        px = image.pixels[..., :3]
        return np.concatenate([px, np.zeros_like(px[..., :1]).repeat(3 - px.shape[2], axis=2)], axis=2)


def contact_sheet(pairs: list[tuple[str, str]], path: Path) -> None:
    """Input | output side by side, one row per frame, as an 8-bit sRGB PNG."""
    rows = []
    for src, dst in pairs:
        a, b = read_image(src).rgba(3), viewable(dst)
        gap = np.ones((a.shape[0], 8, 3), np.float32)
        rows.append(np.concatenate([a, gap, b], axis=1))
        rows.append(np.ones((8, rows[-1].shape[1], 3), np.float32))
    sheet = np.clip(linear_to_srgb(np.concatenate(rows[:-1], axis=0), np), 0, 1)
    spec = oiio.ImageSpec(sheet.shape[1], sheet.shape[0], 3, oiio.UINT8)
    out = oiio.ImageOutput.create(str(path))
    out.open(str(path), spec)
    out.write_image((sheet * 255 + 0.5).astype(np.uint8))
    out.close()


#: What the demo runs when no model is named: the built-in blur, as on a fresh machine.
DEFAULT = ("blur", {"kernel_size": 6})


def demo_prompts(first: int, width: int, height: int) -> Any:
    """A box around the demo plate's moving disc on its first frame, for promptable models (SAM 2)."""
    from mlfarm.prompts import parse_inline

    cx, cy, r = width * (0.2 + 0.6 * ((first % 24) / 23)), height * 0.4, height * 0.15
    box = [max(0, cx - r - 2), max(0, cy - r - 2), min(width, cx + r + 2), min(height, cy + r + 2)]
    return parse_inline([f"{first}:disc:box=" + ",".join(f"{v:.0f}" for v in box)])


def run_demo(settings: Settings, console: Console, frames: int = 12, width: int = 480, height: int = 270,
             model: str | None = None, options: dict[str, Any] | None = None) -> bool:
    """Make a plate, run ``model`` (default: blur) over it on the farm, write a contact sheet.

    Any installed model whose weights are present runs; one that is not ready says why (its
    weights, and the command that fetches them) before anything starts.
    """
    from mlfarm.client import Farm
    from mlfarm.frames import frame_path
    from mlfarm.models.catalog import Catalog
    from mlfarm.progress import follow

    name, opts = (model, dict(options or {})) if model else (DEFAULT[0], dict(DEFAULT[1]))
    catalog = Catalog.from_settings(settings)
    if name not in catalog.entries:
        console.print(f"[red]no model {name!r} here (installed: {', '.join(catalog.names())})")
        return False
    instance = catalog.entry(name).create().with_options(opts)
    reason = instance.check_ready(settings)
    if reason:
        console.print(f"[red]model {name} cannot run here: {reason}")
        return False
    root = settings.storage_root / "demo"
    first = 1001
    plate = write_plate(root / "plate", first, frames, width, height)
    console.print(f"demo plate: {frames} frames {width}x{height} at {plate}")
    prompts = demo_prompts(first, width, height) if instance.promptable else None
    farm_proc = None
    try:
        url = broker_url(settings)
        console.print("using the running farm")
    except NoBrokerError:
        console.print("no farm running: starting the embedded one (Redis + 1 worker) for the demo")
        farm_proc = LocalFarm(settings, workers=1, log_file=settings.data_dir / "demo-worker.log").start()
        url = farm_proc.url
    try:
        farm = Farm(settings, url)
        frame_list = list(range(first, first + frames))
        spec = farm.submit(name, plate, str(root / name / f"plate_{name}.####.exr"), frame_list, opts,
                           chunk=3 if instance.temporal != "sequence" else None, name="demo", prompts=prompts)
        shown = " ".join(f"{k}={v}" for k, v in opts.items())
        console.print(f"submitted job {spec.id}: {name} {shown}".rstrip()
                      + (", chunks of 3" if instance.temporal != "sequence" else f", prompt {prompts.to_json()}"))
        status = follow(lambda: farm.status(spec.id), console, timeout=600)
        console.print(status.summary())
        for fs in status.failed_frames:
            console.print(f"  [red]{fs.reason}")
        if status.state != "done":
            if farm_proc:
                console.print(f"worker log: {settings.data_dir / 'demo-worker.log'}")
            return False
        console.print(f"outputs: {spec.output}")
        picks = [frame_list[0], frame_list[len(frame_list) // 2], frame_list[-1]]
        sheet = root / "contact_sheet.png"
        contact_sheet([(frame_path(spec.input, f), frame_path(spec.output, f)) for f in picks], sheet)
        console.print(f"contact sheet (input | output): {sheet}")
        return True
    finally:
        if farm_proc:
            farm_proc.stop()
