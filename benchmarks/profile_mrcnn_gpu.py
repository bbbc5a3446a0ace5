"""Where a Mask R-CNN worker spends GPU time a frame: each step's kernels, against the network alone.

With two worker processes per GPU the GPU is busy 82-90% of the time (docs/mrcnn_speed.md), so
the farm's ceiling there is the GPU time a frame costs, network and everything around it. This
runs the worker's steps for 1080p batches in one thread, as a lane and an I/O thread run them,
under torch's profiler, and prints the kernel and copy time a frame of each step: upload, the
network's front and heads, composing the planes, ``postprocess`` (labels) and writing (GPU
compression and the chunks' framing); then the same for the network alone at the same batch size
((b) at batch 4). The difference is what the farm adds on the GPU.

Run: python benchmarks/profile_mrcnn_gpu.py [--frames 32] [--batch 4] [--top 25]
Needs a CUDA GPU (``--device cpu --width 160 --height 96 --frames 4`` checks the script itself;
its GPU columns are then empty).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_mrcnn import DETECTIONS, calibrate_threshold, make_weights, network_ms, synthetic_frame

STEPS = ("front", "heads", "compose", "postprocess", "write")


def device_us(event) -> float:
    """Kernel and copy time (µs) under one profiler event, across torch versions' names for it."""
    for name in ("device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def on_gpu(prof, steps: tuple[str, ...] = STEPS) -> list:
    """The profile's kernels and copies (a CPU operation's rows count its kernels' time again, and
    each step's range also has a row on the GPU's timeline, its span: neither is counted)."""
    import torch

    return [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.key not in steps]


def step_kernels(prof, steps: tuple[str, ...] = STEPS) -> dict[str, dict[str, float]]:
    """Per step: each kernel's and copy's time (µs) launched from within the step's range."""
    import torch

    per_step: dict[str, dict[str, float]] = {s: defaultdict(float) for s in steps}
    for e in prof.events():
        if e.name not in steps or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        stack = [e]
        while stack:
            ev = stack.pop()
            for k in ev.kernels:
                per_step[e.name][k.name] += float(k.duration)
            stack.extend(c for c in ev.cpu_children if c.name not in steps)
    return per_step


def kernels_us(prof, steps: tuple[str, ...] = STEPS) -> float:
    """Every kernel's and copy's time (µs): what the GPU was busy with."""
    return sum(device_us(e) for e in on_gpu(prof, steps))


def labelled(name: str, fn):
    import torch

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)
    return run


def profiled(step, batches: int, batch: int, cuda: bool, warm: int = 3) -> tuple:
    """``step(start)`` for ``warm`` batches (cuDNN tuning, nvCOMP plans, pinned buffers), then for
    ``batches`` under torch's profiler: (the profile, their wall seconds)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        for b in range(warm):
            step(b * batch)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            for b in range(batches):
                step(b * batch)
            if cuda:
                torch.cuda.synchronize()
        return prof, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=25, help="kernels to list, by their total time")
    ap.add_argument("--per-step", type=int, default=6, help="kernels to list under each step")
    ap.add_argument("--deflate-type", type=int, default=None, help="nvCOMP's deflate effort (mlfarm/exr/gpu.py)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-gpuprof-"))
    try:
        profile_steps(args, tmp)
    finally:  # the weights file and the written frames: a few hundred MB
        shutil.rmtree(tmp, ignore_errors=True)


def profile_steps(args: argparse.Namespace, tmp: Path) -> None:
    os.environ.update(MLFARM_WEIGHTS_DIR=str(tmp / "weights"), MLFARM_STORAGE_ROOT=str(tmp),
                      MLFARM_MRCNN_BATCH_SIZE=str(args.batch))
    weights = make_weights(tmp / "weights")
    import numpy as np
    import torch

    from mlfarm.exr import gpu as gpu_exr
    from mlfarm.exr.io import write_planes
    from mlfarm.models.builtin.mrcnn import network
    from mlfarm.models.builtin.mrcnn.model import Model
    from mlfarm.settings import get_settings

    cuda = args.device.startswith("cuda")
    if args.deflate_type is not None:
        gpu_exr.DEFLATE_TYPE = args.deflate_type
    settings = get_settings()
    model = Model()
    model.load(args.device)
    net = model._network()
    rgb = [synthetic_frame(f * 7, args.width, args.height)[..., :3].copy() for f in range(8)]
    on_device = [torch.from_numpy(np.clip(im, 0, 1)).to(args.device).permute(2, 0, 1).contiguous() for im in rgb]
    model.thresh = calibrate_threshold(torch, net, on_device[:4])
    model.max_detections = DETECTIONS
    arch = model.architecture.value
    net = network.configured(net, model.min_size, model.max_size, model.thresh, DETECTIONS)  # as the farm runs it
    model._front = labelled("front", model._front)  # before the first batch makes its graphed front
    plain_heads = network.heads
    network.heads = labelled("heads", plain_heads)
    model._compose_batch = labelled("compose", model._compose_batch)
    count = 0

    def farm_batch(start: int) -> None:
        nonlocal count
        batch = [model.preprocess([rgb[(start + i) % len(rgb)]]) for i in range(args.batch)]
        for outputs in model.infer_batch(batch):
            with torch.profiler.record_function("postprocess"):
                images = model.postprocess(outputs)
            with torch.profiler.record_function("write"):
                count += 1
                write_planes(str(tmp / "out" / f"f.{count:04d}.exr"), tmp, model.outputs, images[:5], {},
                             settings.exr_compression, settings.exr_rgba_half, settings.exr_gpu_compress)

    unfused = network.build(arch, weights, fold=False).to(args.device)
    network.fold_batch_norms(unfused)  # as the worker ran it before fuse_relus
    unfused = network.configured(unfused, model.min_size, model.max_size, model.thresh, DETECTIONS)

    def net_batch(start: int, net=net) -> None:
        stacked = torch.stack([on_device[(start + i) % len(on_device)] for i in range(args.batch)])
        network.run(net, list(stacked))

    batches = max(1, args.frames // args.batch)
    frames = batches * args.batch
    results = {}
    for name, step in (("farm", farm_batch), ("network", net_batch),
                       ("unfused", functools.partial(net_batch, net=unfused))):
        if name == "network":
            network.heads = plain_heads
        results[name] = profiled(step, batches, args.batch, cuda)

    prof, wall = results["farm"]
    farm_gpu = kernels_us(prof) / frames / 1000
    net_prof, net_wall = results["network"]
    net_gpu = kernels_us(net_prof) / frames / 1000
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, {args.width}x{args.height}, batch {args.batch}, "
          f"{frames} frames, {DETECTIONS} detections a frame, deflate effort {gpu_exr.deflate_effort()}, one thread, "
          f"profiler on; files {os.path.getsize(tmp / 'out' / f'f.{count:04d}.exr') / 1e6:.2f} MB")
    print(f"GPU ms a frame (kernels and copies) by step of the worker, with each step's largest "
          f"(wall {wall / frames * 1000:.1f} ms a frame):")
    per_step = step_kernels(prof)
    for step in STEPS:
        kernels = per_step[step]
        print(f"  {step:<12} {sum(kernels.values()) / frames / 1000:7.2f}")
        for us, key in sorted(((v, k) for k, v in kernels.items()), reverse=True)[:args.per_step]:
            print(f"      {us / frames / 1000:7.3f}  {key[:100]}")
    rest = farm_gpu - sum(sum(k.values()) for k in per_step.values()) / frames / 1000
    print(f"  {'other':<12} {rest:7.2f}  (the frames' upload, and what the ranges above did not catch)")
    print(f"  {'all':<12} {farm_gpu:7.2f}")
    print(f"network alone at batch {args.batch}: {net_gpu:.2f} GPU ms a frame (wall {net_wall / frames * 1000:.1f} ms)")
    if net_gpu:
        print(f"the farm's steps cost {farm_gpu / net_gpu:.2f}x the network's GPU time; "
              f"at 100% busy a GPU could run {1000 / farm_gpu:.1f} frames/s of them, "
              f"{1000 / net_gpu:.1f} of the network")
    unfused_gpu = kernels_us(results["unfused"][0]) / frames / 1000
    print(f"the network without fuse_relus (batch norms folded only): {unfused_gpu:.2f} GPU ms a frame "
          f"(wall {results['unfused'][1] / frames * 1000:.1f} ms)")
    walls = {(label, b): network_ms(torch, n, on_device * 4, b, args.device)
             for b in (1, args.batch) for label, n in (("fused", net), ("unfused", unfused))}
    print("the network alone, no profiler, ms a frame: " + ", ".join(
        f"{label} batch {b} {ms:.2f} ({1000 / ms:.1f} fps)" for (label, b), ms in walls.items()))
    print(f"\ntop {args.top} kernels and copies of the farm's steps (GPU ms a frame, calls a frame):")
    own = sorted(((device_us(e), e.count, e.key) for e in on_gpu(prof)), reverse=True)
    for us, calls, key in own[:args.top]:
        if us <= 0:
            break
        print(f"  {us / frames / 1000:7.3f}  {calls / frames:6.1f}  {key[:110]}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
