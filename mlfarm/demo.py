"""``mlfarm demo``: the whole path on a fresh machine, ending in a picture a person can look at."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
from rich.console import Console

from mlfarm.broker.connection import NoBrokerError, broker_url
from mlfarm.exr.io import read_image
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


def contact_sheet(pairs: list[tuple[str, str]], path: Path) -> None:
    """Input | output side by side, one row per frame, as an 8-bit sRGB PNG."""
    rows = []
    for src, dst in pairs:
        a, b = read_image(src).rgba(3), read_image(dst).rgba(3)
        gap = np.ones((a.shape[0], 8, 3), np.float32)
        rows.append(np.concatenate([a, gap, b], axis=1))
        rows.append(np.ones((8, rows[-1].shape[1], 3), np.float32))
    sheet = np.clip(linear_to_srgb(np.concatenate(rows[:-1], axis=0), np), 0, 1)
    spec = oiio.ImageSpec(sheet.shape[1], sheet.shape[0], 3, oiio.UINT8)
    out = oiio.ImageOutput.create(str(path))
    out.open(str(path), spec)
    out.write_image((sheet * 255 + 0.5).astype(np.uint8))
    out.close()


def run_demo(settings: Settings, console: Console, frames: int = 12, width: int = 480, height: int = 270) -> bool:
    from mlfarm.client import Farm
    from mlfarm.frames import frame_path
    from mlfarm.progress import follow

    root = settings.storage_root / "demo"
    first = 1001
    plate = write_plate(root / "plate", first, frames, width, height)
    console.print(f"demo plate: {frames} frames {width}x{height} at {plate}")
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
        spec = farm.submit("blur", plate, str(root / "blur" / "plate_blur.####.exr"), frame_list,
                           {"kernel_size": 6}, chunk=3, name="demo")
        console.print(f"submitted job {spec.id}: blur kernel_size=6, chunks of 3")
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
