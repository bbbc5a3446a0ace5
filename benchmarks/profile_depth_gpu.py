"""Where a depth worker spends GPU time a frame: each step's kernels, against the network alone.

Depth in the farm stops at 118-150 frames/s on an H100 even on uncompressed plates, with the network
alone at 418 (docs/benchmarks.md, "what limits depth"). This runs the worker's steps for 1080p frames
in one thread, as an I/O thread and a lane run them, under torch's profiler, and prints the kernel
and copy time a frame of each step and the host time a frame each step took:

- ``prep``: ``preprocess`` (upload, display-referred, resize, normalise; an I/O thread),
- ``network``: the network on the batch (the lane),
- ``planes``: the prediction resized to the plate and made into depth.Z and rgba (the lane),
- ``write``: ``write_planes``, split into ``lines`` (the planes laid out as scanlines), ``predict``
  (OpenEXR's predictor), ``deflate`` (nvCOMP, until its sizes are back), ``adler``, ``chunks``
  (framing) and the rest (the copy to the host, the file).

Then, without the profiler, the same steps run by 1 to ``--threads`` threads at once, each on its own
stream (as I/O threads do, each doing whole frames), to show what one process reaches when nothing
else (Celery, decoding plates, the job's bookkeeping) takes a share.

Run: python benchmarks/profile_depth_gpu.py [--frames 32] [--batch 8] [--threads 8]
Needs a CUDA GPU (``--device cpu --width 160 --height 96 --frames 4 --batch 2 --threads 1`` checks
the script itself; its GPU columns are then empty).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_passes import depth_small
from profile_mrcnn_gpu import device_us, kernels_us, labelled, on_gpu, profiled, step_kernels

WRITE_PARTS = ("lines", "predict", "deflate", "adler", "chunks")
STEPS = ("prep", "network", "planes", "write") + WRITE_PARTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=8, help="most threads in the threaded runs")
    ap.add_argument("--top", type=int, default=20, help="kernels to list, by their total time")
    ap.add_argument("--per-step", type=int, default=4, help="kernels to list under each step")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-depthprof-"))
    try:
        run(args, tmp)
    finally:  # the weights and the written frames
        shutil.rmtree(tmp, ignore_errors=True)


def label_write_parts(gpu_exr) -> None:
    """The write's parts as profiler ranges (module functions ``_encode`` looks up at each call)."""
    gpu_exr.line_bytes = labelled("lines", gpu_exr.line_bytes)
    gpu_exr.predict = labelled("predict", gpu_exr.predict)
    gpu_exr.adler32_lines = labelled("adler", gpu_exr.adler32_lines)
    gpu_exr.chunks = labelled("chunks", gpu_exr.chunks)
    gpu_exr._NvcompDeflate.__call__ = labelled("deflate", gpu_exr._NvcompDeflate.__call__)


def host_ms(prof, frames: int) -> dict[str, float]:
    """Host time a frame (ms) inside each step's range, less the steps nested in it (``planes`` runs
    the network, ``write`` its parts)."""
    import torch

    # Each range has a row on the GPU's timeline too (no host time): only the host's rows count.
    total = {e.key: e.cpu_time_total / frames / 1000 for e in prof.key_averages()
             if e.key in STEPS and e.device_type == torch.autograd.DeviceType.CPU}
    total["planes"] = total.get("planes", 0) - total.get("network", 0)
    total["write"] = total.get("write", 0) - sum(total.get(p, 0) for p in WRITE_PARTS)
    return total


def run(args: argparse.Namespace, tmp: Path) -> None:
    os.environ.update(MLFARM_WEIGHTS_DIR=str(tmp / "weights"), MLFARM_STORAGE_ROOT=str(tmp),
                      MLFARM_DEPTH_BATCH_SIZE=str(args.batch))
    depth_small(tmp / "weights" / "depth-anything-v2-small")
    import numpy as np
    import torch

    from mlfarm.exr import gpu as gpu_exr
    from mlfarm.exr.common import can_encode
    from mlfarm.exr.io import write_planes
    from mlfarm.models.builtin.depth.model import Model
    from mlfarm.settings import get_settings

    cuda = args.device.startswith("cuda")
    settings = get_settings()
    model = Model()
    model.load(args.device)
    model.planes_stay = can_encode(settings.exr_compression, settings.exr_gpu_compress, args.device)  # as the worker
    model._predict = labelled("network", model._predict)  # before the network is built
    model._planes = labelled("planes", model._planes)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, args.width, dtype=np.float32)[None, :, None]
    plates = [np.concatenate([np.clip(ramp * (0.3 + 0.1 * i) + rng.normal(0, 0.02, (args.height, args.width, 3)),
                                      0, None), np.ones((args.height, args.width, 1))], 2).astype(np.float16)
              for i in range(4)]
    (tmp / "out").mkdir()
    count = 0

    def write(outputs, name: str) -> None:
        write_planes(str(tmp / "out" / name), tmp, model.outputs, outputs, {},
                     settings.exr_compression, settings.exr_rgba_half, settings.exr_gpu_compress)

    def farm_batch(start: int) -> None:
        nonlocal count
        batch = []
        for i in range(args.batch):
            with torch.profiler.record_function("prep"):
                batch.append(model.preprocess([plates[(start + i) % len(plates)]]))
        for outputs in model.infer_batch(batch):
            if cuda:  # the lane marks them ready, the I/O thread's stream waits (as the worker does)
                gpu_exr.take_over(outputs, gpu_exr.mark_ready(outputs))
            with torch.profiler.record_function("write"):
                count += 1
                write(outputs, f"f.{count:04d}.exr")

    _, prep = model._network()
    ready = [model.preprocess([p]).pixels for p in plates]

    def net_batch(start: int) -> None:
        stacked = torch.stack([ready[(start + i) % len(ready)] for i in range(args.batch)])
        prep["predict"](stacked)

    label_write_parts(gpu_exr)
    batches = max(1, args.frames // args.batch)
    frames = batches * args.batch
    results = {name: profiled(step, batches, args.batch, cuda, warm=2)
               for name, step in (("farm", farm_batch), ("network", net_batch))}

    prof, wall = results["farm"]
    farm_gpu = kernels_us(prof, STEPS) / frames / 1000
    net_gpu = kernels_us(results["network"][0], STEPS) / frames / 1000
    size = os.path.getsize(tmp / "out" / f"f.{count:04d}.exr") / 1e6
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {args.width}x{args.height}, batch {args.batch}, "
          f"{frames} frames, precision {model.autocast or 'fp32'}, deflate effort {gpu_exr.deflate_effort()}, "
          f"one thread, profiler on; files {size:.2f} MB")
    print(f"by step: GPU ms a frame (kernels and copies), host ms a frame; each step's largest kernels "
          f"(wall {wall / frames * 1000:.1f} ms a frame):")
    per_step = step_kernels(prof, STEPS)
    host = host_ms(prof, frames)
    for step in STEPS:
        kernels = per_step[step]
        indent = "    " if step in WRITE_PARTS else "  "
        own = " (its parts below counted there)" if step == "write" else ""
        gpu_ms = sum(kernels.values()) / frames / 1000
        print(f"{indent}{step:<10} GPU {gpu_ms:6.2f}  host {host.get(step, 0):6.2f}{own}")
        for us, key in sorted(((v, k) for k, v in kernels.items()), reverse=True)[:args.per_step]:
            print(f"{indent}      {us / frames / 1000:7.3f}  {key[:100]}")
    # nvCOMP launches its kernels itself, not through torch: the profiler sees them but ties them to no range.
    nvcomp = sum(device_us(e) for e in on_gpu(prof, STEPS) if "deflate" in e.key) / frames / 1000
    print(f"    {'nvCOMP':<10} GPU {nvcomp:6.2f}  (its deflate kernels, by name: launched outside torch, so "
          f"under no range)")
    rest = farm_gpu - nvcomp - sum(sum(k.values()) for k in per_step.values()) / frames / 1000
    print(f"  {'other':<10} GPU {rest:6.2f}  (what the ranges above did not catch)")
    print(f"  {'all':<10} GPU {farm_gpu:6.2f}")
    print(f"network alone at batch {args.batch}: {net_gpu:.2f} GPU ms a frame "
          f"(wall {results['network'][1] / frames * 1000:.2f} ms)")
    if net_gpu:
        print(f"the farm's steps cost {farm_gpu / net_gpu:.2f}x the network's GPU time; at 100% busy a GPU "
              f"could run {1000 / farm_gpu:.1f} frames/s of them, {1000 / net_gpu:.1f} of the network")
    print(f"\ntop {args.top} kernels and copies of the farm's steps (GPU ms a frame, calls a frame):")
    rows = sorted(((device_us(e), e.count, e.key) for e in on_gpu(prof, STEPS)), reverse=True)
    for us, calls, key in rows[:args.top]:
        if us <= 0:
            break
        print(f"  {us / frames / 1000:7.3f}  {calls / frames:6.1f}  {key[:110]}")
    sys.stdout.flush()
    threaded(args, torch, model, plates, tmp, cuda)


def threaded(args: argparse.Namespace, torch, model, plates, tmp: Path, cuda: bool) -> None:
    """Frames a second with 1, 2, 4 .. ``--threads`` threads, each preparing, running and writing whole
    batches on its own stream; the network runs under a lock, as one lane runs it. Then, at the most
    threads, the same with files on ``/dev/shm`` (no disk), with nvCOMP's cheapest deflate, and with
    outputs uncompressed (written by the host, as the farm writes them with ``MLFARM_EXR_COMPRESSION=none``)."""
    from mlfarm.exr import gpu as gpu_exr
    from mlfarm.exr.io import write_planes
    from mlfarm.settings import get_settings

    settings = get_settings()
    lane = threading.Lock()
    per_thread = max(2, args.frames // args.batch)

    def work(me: int, rounds: int, root: Path, compression: str) -> None:
        with torch.inference_mode():
            for _ in range(rounds):
                batch = [model.preprocess([plates[(me + i) % len(plates)]]) for i in range(args.batch)]
                with lane:
                    results = model.infer_batch(batch)
                    ready = gpu_exr.mark_ready(results[0]) if cuda else None
                for i, outputs in enumerate(results):
                    if cuda:
                        gpu_exr.take_over(outputs, ready)
                    write_planes(str(root / f"t{me}.{i}.exr"), root, model.outputs, outputs, {}, compression,
                                 settings.exr_rgba_half, settings.exr_gpu_compress)

    def rate(n: int, root: Path, compression: str) -> float:
        for rounds in (1, per_thread):  # the first: warm each thread's stream, codec and buffers
            threads = [threading.Thread(target=work, args=(me, rounds, root, compression)) for me in range(n)]
            t = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
        return n * per_thread * args.batch / wall

    disk = tmp / "out"
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    print(f"\nthreads, each doing whole batches (prepare, network under one lock, write); no profiler; "
          f"files in {disk}:")
    for n in [1] + [n for n in (2, 4, 8, 12, 16) if n <= args.threads]:
        print(f"  {n:2d} threads: {rate(n, disk, settings.exr_compression):7.1f} frames/s", flush=True)
    if shm is None:
        return
    shm_out = Path(tempfile.mkdtemp(prefix="mlfarm-depthprof-", dir=shm))
    try:
        n = args.threads
        print(f"{n} threads, files in {shm_out}: {rate(n, shm_out, settings.exr_compression):7.1f} frames/s",
              flush=True)
        gpu_exr.DEFLATE_TYPE = 0  # codecs are made per thread: the new threads' use it
        print(f"{n} threads, /dev/shm, deflate effort 0: {rate(n, shm_out, settings.exr_compression):7.1f} "
              f"frames/s", flush=True)
        gpu_exr.DEFLATE_TYPE = None
        print(f"{n} threads, /dev/shm, uncompressed: {rate(n, shm_out, 'none'):7.1f} frames/s", flush=True)
    finally:
        shutil.rmtree(shm_out, ignore_errors=True)


if __name__ == "__main__":
    main()
