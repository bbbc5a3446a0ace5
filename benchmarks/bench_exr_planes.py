"""What one output frame costs the worker's I/O threads: Mask R-CNN's planes written two ways.

mlfarm.exr.io writes EXRs through OpenEXR's own Python bindings, one contiguous array per channel. The
baseline, in the same run, is what it did before: the same pixels through OpenImageIO (an all-half
block handed over as it is). This times ``assemble_planes`` + the write for 1080p planes like
Mask R-CNN's (one H x W x 8 half block), with zip and rle, on one thread (wall and CPU time) and
on every core, on a grainy and a clean plate.

``--depth`` times instead what compressing the depth model's planes on the host would cost (a grey
half ``rgba`` and a float ``depth.Z``, written by ``write_planes`` as a CPU worker writes them): GB/s
of plane bytes a core, by compression, and the cores that ``--rate`` frames/s would take. It backs
the arithmetic under "Where depth's GPU time goes" in docs/benchmarks.md.

Run: .venv/bin/python benchmarks/bench_exr_planes.py [--frames 6] [--width 1920 --height 1080]
     .venv/bin/python benchmarks/bench_exr_planes.py --depth [--rate 334]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_mrcnn import synthetic_frame


def planes(grain: float, width: int, height: int, half: bool, block: bool = False) -> list[np.ndarray]:
    """rgba plus matte/instance/class/score planes like Mask R-CNN's, 20 instances (with ``block``:
    slices of one H x W x 8 array)."""
    rgba = synthetic_frame(1, width, height, grain)
    ids = np.zeros((height, width), np.float32)
    for k in range(20):
        y, x = (k * height) // 25, (k * width) // 25
        ids[y:y + height // 4, x:x + width // 8] = k + 1
    data = [(ids > 0).astype(np.float32), ids, np.where(ids > 0, 1 + ids % 7, 0).astype(np.float32),
            np.where(ids > 0, 0.5 + ids / 50, 0).astype(np.float32)]
    dtype = np.float16 if half else np.float32
    if block:
        whole = np.concatenate([rgba] + [d[:, :, None] for d in data], axis=2).astype(dtype)
        return [whole[:, :, :4]] + [whole[:, :, 4 + i] for i in range(len(data))]
    return [rgba.astype(dtype)] + [d.astype(dtype) for d in data]


def write_with_oiio(path: str, pixels: np.ndarray, channels: list[str], compression: str) -> None:
    """The baseline: the writer mlfarm.exr.io used before, OpenImageIO with the block as it is."""
    import OpenImageIO as oiio

    height, width, nch = pixels.shape
    spec = oiio.ImageSpec(width, height, nch, oiio.HALF)
    spec.channelnames = tuple(channels)
    spec.attribute("compression", compression)
    out = oiio.ImageOutput.create(path)
    assert out.open(path, spec), oiio.geterror()
    assert out.write_image(pixels) and out.close(), out.geterror()


def depth_planes(width: int, height: int) -> list[np.ndarray]:
    """Planes like the depth model's: a smooth float depth with a little sensor-like noise, and its
    grey half preview with alpha 1 (the model's order: rgba, then depth.Z)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((height, width)).astype(np.float32)
    z = 0.2 + 0.6 * y / height + 0.05 * np.sin(x / 37) + 0.002 * noise
    grey = (z / z.max()).astype(np.float16)
    return [np.stack([grey, grey, grey, np.ones_like(grey)], axis=2), z]


def depth_on_host(args: argparse.Namespace, root: Path) -> None:
    """CPU seconds one thread spends writing depth's planes, as GB/s of plane bytes and cores needed."""
    from mlfarm.exr.io import configure_openexr, write_planes

    configure_openexr(0)
    outputs = {"rgba": 4, "depth": ("Z",)}
    images = depth_planes(args.width, args.height)
    nbytes = sum(im.nbytes for im in images)
    print(f"depth's planes {args.width}x{args.height}: {nbytes / 1e6:.1f} MB a frame; "
          f"at {args.rate:g} frames/s {nbytes * args.rate / 1e9:.1f} GB/s to compress")
    for compression in ("zips", "zip", "rle", "none"):
        path = str(root / f"depth.{compression}.exr")
        write_planes(path, root, outputs, images, {}, compression)  # warm up
        cpu = time.process_time()
        for _ in range(args.frames):
            write_planes(path, root, outputs, images, {}, compression)
        per_frame = (time.process_time() - cpu) / args.frames
        print(f"{compression:5s}: {per_frame * 1000:6.1f} CPU ms a frame, {nbytes / per_frame / 1e9:5.2f} GB/s a core, "
              f"{os.path.getsize(path) / 1e6:5.2f} MB; {args.rate:g} frames/s would take "
              f"{per_frame * args.rate:5.1f} cores", flush=True)


def mask_rcnn_planes(args: argparse.Namespace, root: Path) -> None:
    """OpenEXR (mlfarm's writer) against OpenImageIO (before) on Mask R-CNN-like planes."""
    from mlfarm.exr.io import assemble_planes, configure_openexr, write_exr

    configure_openexr(0)  # OpenImageIO's OpenEXR pool as a worker sizes it
    outputs = {"rgba": 4, "matte": ("A",), "instance": ("id",), "class": ("id",), "score": ("value",)}
    cores = os.cpu_count() or 1
    print(f"{cores} cores, {args.width}x{args.height}, {args.frames} frames per measurement, all-half block")
    for grain in (0.01, 0.0):
        images = planes(grain, args.width, args.height, True, True)
        for compression in ("zip", "rle"):
            results = {}
            for label in ("OpenImageIO (before)", "OpenEXR (mlfarm)"):
                def write(i: int, label: str = label, compression: str = compression,
                          images: list[np.ndarray] = images) -> None:
                    pixels, names, data = assemble_planes(outputs, images)
                    path = str(root / f"{label[:4]}.{compression}.{i:04d}.exr")
                    if label.startswith("OpenImageIO"):
                        write_with_oiio(path, pixels, names, compression)
                    else:
                        write_exr(path, root, pixels, names, data, {"mlfarm/frame": i}, compression)

                write(0)  # warm up
                t, cpu = time.perf_counter(), time.process_time()
                for i in range(args.frames):
                    write(i)
                one = (time.perf_counter() - t) / args.frames
                one_cpu = (time.process_time() - cpu) / args.frames
                t, cpu = time.perf_counter(), time.process_time()
                with ThreadPoolExecutor(cores) as pool:
                    list(pool.map(write, range(args.frames * cores)))
                many = args.frames * cores / (time.perf_counter() - t)
                many_cpu = (time.process_time() - cpu) / (args.frames * cores)
                results[label] = (one, many, many_cpu)
                size = os.path.getsize(root / f"{label[:4]}.{compression}.0000.exr") / 1e6
                print(f"grain {grain:<5g} {compression:4s} {label:21s}: {one * 1000:6.1f} ms a frame on 1 thread "
                      f"({one_cpu * 1000:6.1f} ms CPU), {many:6.2f} frames/s on {cores} threads "
                      f"({many_cpu * 1000:6.1f} CPU ms a frame), {size:.2f} MB", flush=True)
            (b1, bn, bc), (n1, nn, nc) = results.values()
            print(f"grain {grain:<5g} {compression:4s} OpenEXR / OpenImageIO: {b1 / n1:.2f}x faster on 1 thread, "
                  f"{nn / bn:.2f}x the frames/s on {cores}, {nc / bc:.2f}x the CPU a frame", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--depth", action="store_true", help="depth's planes compressed on the host instead")
    ap.add_argument("--rate", type=float, default=334.0,
                    help="with --depth: frames/s to size the cores for (334: 0.8x depth's network alone, H100)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlfarm-exr-bench-"))
    try:
        (depth_on_host if args.depth else mask_rcnn_planes)(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
