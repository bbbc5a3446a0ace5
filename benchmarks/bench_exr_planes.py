"""What one output frame costs the worker's I/O threads: Mask R-CNN's planes written three ways.

frame_io writes data planes as float unless the model returns them as float16; a file mixing half
rgba with float data planes goes through OpenImageIO's slow mixed-format conversion. All-half planes
are handed to OpenImageIO as float16, and planes that are channel slices of one block (as mrcnn
returns them) are not even assembled. This times ``assemble_planes`` + ``write_exr`` for the same
1080p planes: mixed (the baseline), separate all-half arrays, and one all-half block; on one thread
and on every core, with the farm's default compression (zip), on a grainy and a clean plate.

Run: .venv/bin/python benchmarks/bench_exr_planes.py [--frames 6] [--width 1920 --height 1080]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    args = ap.parse_args()

    from mlfarm.worker.frame_io import assemble_planes, write_exr

    outputs = {"rgba": 4, "matte": ("A",), "instance": ("id",), "class": ("id",), "score": ("value",)}
    root = Path(tempfile.mkdtemp(prefix="mlfarm-exr-bench-"))
    cores = os.cpu_count() or 1
    print(f"{cores} cores, {args.width}x{args.height}, {args.frames} frames per measurement, zip")
    try:
        for grain in (0.01, 0.0):
            results = {}
            for label, half, block in (("mixed half rgba + float data", False, False),
                                       ("all half, separate arrays", True, False),
                                       ("all half, one block (mrcnn now)", True, True)):
                images = planes(grain, args.width, args.height, half, block)

                def write(i: int, images: list[np.ndarray] = images, tag: str = f"{half}{block}") -> None:
                    pixels, names, data = assemble_planes(outputs, images)
                    write_exr(str(root / f"{tag}.{i:04d}.exr"), root, pixels, names, data, {"mlfarm/frame": i})

                write(0)  # warm up
                t = time.perf_counter()
                for i in range(args.frames):
                    write(i)
                one = (time.perf_counter() - t) / args.frames
                t = time.perf_counter()
                with ThreadPoolExecutor(cores) as pool:
                    list(pool.map(write, range(args.frames * cores)))
                many = args.frames * cores / (time.perf_counter() - t)
                results[(half, block)] = (one, many)
                print(f"grain {grain:<5g} {label:38s}: {one * 1000:7.1f} ms a frame on 1 thread, "
                      f"{many:6.2f} frames/s on {cores} threads")
            base = results[(False, False)]
            for key, what in (((True, False), "all half"), ((True, True), "one block")):
                print(f"grain {grain:<5g} {what} / mixed: {base[0] / results[key][0]:.2f}x faster on 1 thread, "
                      f"{results[key][1] / base[1]:.2f}x on {cores}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
