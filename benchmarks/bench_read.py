"""Decoding plates on the host: how many 1080p EXR frames a second a worker's I/O threads read.

One run, same files, same machine, three ways of decoding each frame:

- baseline: OpenImageIO's Python binding reading the frame as float32 (``read_image`` before
  2026-12-06; the binding keeps the GIL while it decodes, so threads take turns);
- ``read_image``: OpenEXR's binding for a plain EXR, which lets go of the GIL while it inflates;
- ``read_image(half=True)``: the same, the half data kept half (what depth, flow and SAM 2 take:
  they widen frames on their GPU). An RGB(A) plate is decoded straight into one interleaved array;
- half planes gathered: how ``read_image(half=True)`` decoded before 2026-12-06, later that day
  (each channel decoded to its own plane, then copied into an interleaved array);
- on a machine with a CUDA GPU and nvCOMP, ``read_image(half=True, device="cuda")``: the file's bytes
  read on the host, decoded on the GPU (``mlfarm.exr.gpu_read``; each thread on its own stream),
  the frame ready there when it returns. Checked against the host's pixels first.

Each with 1 thread and with ``--threads`` threads (default: the cores this process may use), as a
worker's I/O pool reads. The plate is 1920x1080 RGBA half, zip, with film-like grain (a smooth plate
compresses to almost nothing and flatters every decoder), in the page cache: the figures are decode
cost, not disk. Figures are frames/s and ratios against the baseline in this run.

Run: python benchmarks/bench_read.py [--frames 24] [--threads N] [--width 1920 --height 1080]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import OpenImageIO as oiio


def grainy_plate(folder: Path, frames: int, width: int, height: int, compression: str = "zip") -> list[str]:
    """Gradients with per-frame grain (sigma 0.02), half RGBA, zip: about 7.6 MB a 1080p frame."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height), np.ones_like(x)], -1)
    paths = []
    for i in range(frames):
        pixels = base.copy()
        pixels[..., :3] += rng.normal(0, 0.02, (height, width, 3)).astype(np.float32)
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.attribute("compression", compression)
        path = str(folder / f"plate.{1001 + i:04d}.exr")
        out = oiio.ImageOutput.create(path)
        out.open(path, spec)
        out.write_image(pixels.astype(np.float16))
        out.close()
        paths.append(path)
    return paths


def openimageio_float(path: str) -> np.ndarray:
    """The baseline: the whole frame decoded by OpenImageIO's binding as float32."""
    inp = oiio.ImageInput.open(path)
    pixels = inp.read_image(0, 0, 0, inp.spec().nchannels, "float")
    inp.close()
    return np.asarray(pixels)


def planes_gathered(path: str) -> np.ndarray:
    """The earlier ``read_image(half=True)``: separate planes from OpenEXR's binding, then interleaved."""
    import OpenEXR

    with OpenEXR.File(path, separate_channels=True) as exr:
        planes = {name: ch.pixels for name, ch in exr.channels().items()}
    first = planes["R"]
    out = np.empty((*first.shape, 4), dtype=first.dtype)
    for i, name in enumerate("RGBA"):
        out[..., i] = planes[name]
    return out


def rate(read: Callable[[str], object], paths: list[str], threads: int, repeats: int = 2) -> float:
    """Frames/s reading every path ``repeats`` times on ``threads`` threads (the best of two rounds)."""
    todo = paths * repeats
    best = 0.0
    for _ in range(2):
        t = time.perf_counter()
        if threads == 1:
            for p in todo:
                read(p)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, todo))
        best = max(best, len(todo) / (time.perf_counter() - t))
    return best


def main() -> None:
    from mlfarm.cpus import available_cpus
    from mlfarm.exr.io import configure_openexr, read_image

    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="threads for the parallel figures (0: the usable cores)")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--compression", default="zip", help="zip (16 lines a chunk) or zips (one, Nuke's default)")
    args = ap.parse_args()
    cores = len(available_cpus())
    threads = args.threads or cores
    configure_openexr(0)  # OpenImageIO's pool as a worker outside sizing has it: one thread per core
    paths = grainy_plate(Path(tempfile.mkdtemp(prefix="bench-read-")), args.frames, args.width, args.height,
                         args.compression)
    size = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
    print(f"plate: {len(paths)} frames {args.width}x{args.height} RGBA half {args.compression} with grain, "
          f"{size:.1f} MB a frame; {cores} usable core(s)", flush=True)
    decoded = read_image(paths[0]).pixels  # both ways decode the same pixels
    assert np.array_equal(decoded, openimageio_float(paths[0]).reshape(decoded.shape))
    ways = {"baseline (OpenImageIO, float32)": openimageio_float,
            "read_image (float32)": read_image,
            "read_image(half=True)": lambda p: read_image(p, half=True),
            "half planes gathered (before)": planes_gathered}
    assert np.array_equal(planes_gathered(paths[0]), read_image(paths[0], half=True).pixels)
    from mlfarm.exr.common import can_decode

    if can_decode(True, "cuda"):
        on_gpu = read_image(paths[0], half=True, device="cuda").pixels
        assert on_gpu.is_cuda and np.array_equal(on_gpu.cpu().numpy(), read_image(paths[0], half=True).pixels)
        ways["read_image(half=True, device=cuda)"] = lambda p: read_image(p, half=True, device="cuda")
    figures: dict[tuple[str, int], float] = {}
    for name, read in ways.items():
        for n in sorted({1, threads}):
            figures[name, n] = rate(read, paths, n)
    base = {n: figures["baseline (OpenImageIO, float32)", n] for n in sorted({1, threads})}
    for (name, n), fps in figures.items():
        print(f"{name:36s} {n:2d} thread(s): {fps:7.1f} frames/s  {fps / base[n]:4.2f}x the baseline on as many "
              f"threads; {1000 * n / fps:5.1f} ms of a thread a frame", flush=True)


if __name__ == "__main__":
    main()
