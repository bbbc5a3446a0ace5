"""What GPU compression of outputs saves: mlfarm/exr/gpu.py against OpenEXR's writer, one run.

Mask R-CNN's worker is CPU-bound with zip outputs (README, Mask R-CNN speed): encoding its eight
half channels at 1080p costs ~0.2 core-seconds a frame. GPU workers now compress zips outputs on
the GPU (nvCOMP deflate; ``mlfarm.exr.io.write_planes`` with CUDA tensors). This writes the same 1080p
planes both ways, from one thread and from several at once (as the worker's I/O threads do), and
prints for each: frames/s, the CPU seconds a frame costs the process, the file size, and whether
OpenImageIO reads the GPU file back bit-exact against OpenEXR's. Without CUDA and nvCOMP only the
CPU writer runs (a baseline with nothing to compare: the script says so and exits 1).

Run: python benchmarks/bench_gpu_zip.py [--frames 40] [--threads 1,8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_exr_planes import planes

OUTPUTS = {"rgba": 4, "matte": ("A",), "instance": ("id",), "class": ("id",), "score": ("value",)}


def timed(write, frames: int, threads: int) -> tuple[float, float]:
    """frames/s and CPU ms a frame of ``write(i)`` for ``frames`` frames on ``threads`` threads."""
    write(0)  # warm: codecs, streams, pinned buffers
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(frames)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return frames / wall, cpu / frames * 1000


def stages(torch, gpu_exr, channels: list, frames: int) -> str:
    """GPU milliseconds a frame of each step of gpu_exr's encoder, one step at a time (synchronised)."""
    from mlfarm.exr.gpu import _nvcomp_deflate

    spent: dict[str, float] = {}

    def step(name: str, fn, *args):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*args)
        torch.cuda.synchronize()
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return out

    def predict_into(predicted, lines, length: int) -> None:
        predicted[:, :length] = gpu_exr.predict(torch, lines)

    with torch.inference_mode():
        for i in range(frames + 1):
            if i == 1:
                spent.clear()  # the first frame warms up
            lines = step("layout", gpu_exr.line_bytes, torch, channels)
            height, length = lines.shape
            deflate = _nvcomp_deflate(torch)
            plan = deflate.plan(height, length, lines.device)
            step("predictor", predict_into, plan.predicted, lines, length)
            adler = step("adler32", gpu_exr.adler32_lines, torch, plan.predicted[:, :length])
            comp, offsets, sizes = step("deflate", deflate, plan)
            payload, _ = step("chunks", gpu_exr.chunks, torch, lines, comp, offsets, sizes, adler)
            step("to host", payload.cpu)
    return ", ".join(f"{k} {v / frames * 1000:.2f}" for k, v in spent.items())


def read(path: Path) -> np.ndarray:
    import OpenImageIO as oiio

    inp = oiio.ImageInput.open(str(path))
    assert inp is not None, oiio.geterror()
    spec = inp.spec()
    pixels = inp.read_image(0, 0, 0, spec.nchannels, "half")
    inp.close()
    return pixels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--deflate-type", default="1", help="nvCOMP deflate efforts to compare (0 fastest .. 5), e.g. 1,2")
    args = ap.parse_args()

    import torch

    from mlfarm.exr import gpu as gpu_exr
    from mlfarm.exr.io import device_channels, write_planes

    root = Path(tempfile.mkdtemp(prefix="mlfarm-gpuzip-"))
    images = planes(0.01, args.width, args.height, True, True)  # Mask R-CNN's planes: H x W x 8 half
    meta = {"mlfarm/frame": 1, "mlfarm/job": "bench"}
    cuda = torch.cuda.is_available() and gpu_exr.nvcomp_available()
    device = [torch.from_numpy(np.array(im)).cuda() for im in images] if cuda else []
    print(f"{args.width}x{args.height}, 8 half channels; "
          f"{torch.cuda.get_device_name() if cuda else 'no CUDA or no nvCOMP'}; {os.cpu_count()} cores", flush=True)
    rows = {}
    for threads in (int(t) for t in args.threads.split(",")):
        gpu_runs = [(f"GPU zips {t}", "zips", device, int(t)) for t in args.deflate_type.split(",")] if cuda else []
        for label, compression, imgs, effort in [("CPU zip", "zip", images, 0), ("CPU zips", "zips", images, 0),
                                                 *gpu_runs]:
            gpu_exr.DEFLATE_TYPE = effort
            gpu_exr._local.__dict__.clear()  # codecs are made per thread: new ones with this effort

            def write(i: int, compression: str = compression, imgs: list = imgs, label: str = label) -> None:
                name = f"{label.replace(' ', '_')}.{i % 8}.exr"
                write_planes(str(root / name), root, OUTPUTS, imgs, meta, compression)

            fps, cpu_ms = timed(write, args.frames, threads)
            size = os.path.getsize(root / f"{label.replace(' ', '_')}.0.exr") / 1e6
            rows[(label, threads)] = (fps, cpu_ms)
            print(f"{threads:2d} threads  {label:10s}: {fps:6.1f} frames/s, {cpu_ms:6.1f} ms CPU a frame, "
                  f"{size:.2f} MB", flush=True)
        if threads == 1:
            for label, _, _, effort in gpu_runs:
                gpu_exr.DEFLATE_TYPE = effort
                gpu_exr._local.__dict__.clear()
                channels = [(n, t) for n, t in device_channels(OUTPUTS, device, True)]
                print(f"    {label} steps, ms a frame: {stages(torch, gpu_exr, channels, 10)}", flush=True)
        for label, *_ in gpu_runs:
            gpu, cpu = rows[(label, threads)], rows[("CPU zips", threads)]
            print(f"{threads:2d} threads  {label} / CPU zips: {gpu[0] / cpu[0]:.2f}x frames/s, "
                  f"{gpu[1] / cpu[1]:.2f}x the CPU a frame", flush=True)
    if not cuda:
        print("nothing to compare without CUDA and nvCOMP (pip install '.[gpu]')", flush=True)
        sys.exit(1)
    want = read(root / "CPU_zips.0.exr").view(np.uint16)
    exact = all(np.array_equal(read(root / f"{label.replace(' ', '_')}.0.exr").view(np.uint16), want)
                for label, *_ in gpu_runs)
    print(f"OpenImageIO reads the GPU files back {'bit-exact' if exact else 'DIFFERENT'} against OpenEXR's", flush=True)
    for f in root.iterdir():
        f.unlink()
    root.rmdir()
    if not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
