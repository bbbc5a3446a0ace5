"""The frame cache: what resubmitting a finished job costs, against its first render in the same run.

A 1080p RGBA half/zip plate (a graded ramp with grain, so it compresses like a plate, not like pure
noise) is blurred by one local worker (first render), then the same job is submitted again: every
frame is found on the storage and none is rendered. Printed: both wall times, their ratio (target:
the resubmission at most 5% of the first render), and the per-frame cost of the key check measured
in-process: hashing the input frame, then finding and verifying the output (its size and digest).

Run: .venv/bin/python benchmarks/bench_cache.py [--frames 500] [--chunk 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
from bench_farm import start, stop


def write_plate(folder: Path, n: int, width: int, height: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    ramp = np.linspace(0.05, 0.9, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 4), np.float32)
    ramp[..., 3] = 1.0
    grain = rng.normal(0, 0.02, (height, width + n, 4)).astype(np.float32)
    for f in range(1, n + 1):
        pixels = ramp + grain[:, f:f + width]
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.attribute("compression", "zip")
        path = str(folder / f"p.{f:04d}.exr")
        out = oiio.ImageOutput.create(path)
        out.open(path, spec)
        out.write_image(pixels)
        out.close()
    return str(folder / "p.####.exr")


def wait(farm, job_id: str) -> object:
    while not (st := farm.status(job_id)).finished:
        time.sleep(0.05)
    return st


def key_check_ms(settings, url: str, plate: str, out: str, frames: list[int]) -> tuple[float, float]:
    """Median milliseconds a frame's check costs in a worker: (hashing its input, finding its output)."""
    from mlfarm.broker.connection import redis_client
    from mlfarm.frames import frame_path
    from mlfarm.worker.frame_cache import FrameCache, header_key, input_digest

    cache = FrameCache(redis_client(url), settings)
    hashing, finding = [], []
    for f in frames:
        t = time.perf_counter()
        assert input_digest(frame_path(plate, f)) is not None
        hashing.append(time.perf_counter() - t)
        target = frame_path(out, f)
        key = header_key(target)  # the key the worker computed; here only to look it up again
        t = time.perf_counter()
        assert cache.find(key, target) == "here"
        finding.append(time.perf_counter() - t)
    return statistics.median(hashing) * 1000, statistics.median(finding) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=500, help="1080p frames in the job")
    ap.add_argument("--chunk", type=int, default=None, help="frames per task (default: MLFARM_DEFAULT_CHUNK)")
    args = ap.parse_args()

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.client import Farm
    from mlfarm.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-bench-cache-"))
    server = EmbeddedRedis.start(tmp / "redis")
    root = tmp / "storage"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")},
           "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(root), "MLFARM_DEVICE": "cpu",
           "MLFARM_DATA_DIR": str(tmp / "data")}
    settings = Settings(broker_url=server.url, storage_root=root, data_dir=tmp / "data", device="cpu")
    farm = Farm(settings, server.url)
    procs: list[subprocess.Popen] = []
    try:
        print(f"machine: {os.cpu_count()} cores; {args.frames} frames 1920x1080 RGBA half/zip, blur kernel 5")
        plate = write_plate(root / "plate", args.frames, 1920, 1080)
        frames = list(range(1, args.frames + 1))
        procs.append(start([sys.executable, "-m", "mlfarm", "worker", "--name", "c1@bench"], env,
                           tmp / "w1.log", "c1@bench ready."))
        options = {"kernel_size": 5}
        warm = wait(farm, farm.submit("blur", plate, str(root / "warm" / "o.####.exr"), frames[:4], options,
                                      force=True).id)
        assert warm.state == "done", warm.summary()
        out = str(root / "out" / "o.####.exr")
        t = time.perf_counter()
        first = wait(farm, farm.submit("blur", plate, out, frames, options, chunk=args.chunk, force=True).id)
        first_s = time.perf_counter() - t
        assert first.state == "done" and first.counts["done"] == len(frames), first.summary()
        t = time.perf_counter()
        again = wait(farm, farm.submit("blur", plate, out, frames, options, chunk=args.chunk).id)
        again_s = time.perf_counter() - t
        assert again.state == "done" and again.counts["cached"] == len(frames), again.summary()
        hashing, finding = key_check_ms(settings, server.url, plate, out, frames[:50])
        print(f"first render            : {first_s:8.1f} s  {len(frames) / first_s:6.2f} frames/s (baseline)")
        print(f"resubmitted, all cached: {again_s:8.1f} s  {len(frames) / again_s:6.1f} frames/s  "
              f"= {again_s / first_s:.1%} of the first render (target <= 5%)")
        print(f"key check per frame     : {hashing:.2f} ms hashing the input + {finding:.2f} ms finding and verifying "
              f"the output = {(hashing + finding):.2f} ms; first render {first_s / len(frames) * 1000:.0f} ms a frame")
    finally:
        stop(procs)
        server.stop()


if __name__ == "__main__":
    main()
