"""Depth Anything V2 and RAFT at 1080p on the GPU: the farm against the naive loop and the network alone.

One run, same weights (Depth Anything V2 small's and torchvision raft_large's configurations, random
with a fixed seed, saved where the plugins look: the GPU machine has no internet), same EXR plate.

depth  (a) naive: per frame, the image processor on the host, the model, the depth resized to the
           plate (``post_process_depth_estimation``) and copied to the host. fp32.
       (b) the network alone on GPU-resident preprocessed frames, batch 1 and 4, fp32 and bf16
           autocast; and the largest difference bf16 makes to the prediction, relative to its range.
       (c) mlfarm: EXR on disk -> Farm.submit -> GPU workers -> depth.Z + rgba EXRs on disk;
           (c_graphs) the same with the network replayed as a CUDA graph (MLFARM_DEPTH_CUDA_GRAPHS=true);
           (c_gpu_decode) where nvCOMP is installed, the same with plates decoded on the GPU
           (MLFARM_EXR_GPU_DECODE=true) instead of the host's cores;
           (c_none) the same with outputs written uncompressed (MLFARM_EXR_COMPRESSION=none): what
           compressing them costs. Not counted in (c): zips outputs are the farm's default;
           (c_no_pools) where nvCOMP is installed, the same with nvCOMP's own allocators
           (MLFARM_EXR_NVCOMP_POOLS=false) instead of mlfarm's pools. Not counted in (c) either;
           (c_NAME) each ``--variant NAME:MLFARM_X=1,MLFARM_Y=2`` (``workers=N``: N worker processes on
           the GPU), the same job with those settings. Not counted in (c).
flow   (a) naive: per pair, ``raft_large(first, second)`` and the flow copied to the host.
       (b) the network alone on GPU-resident pairs, batch 1 and 4.
       (c) mlfarm: two pairs per frame (forward and backward; the ends have one), pairs/s, with the
           worker processes `mlfarm worker --gpus` places on the GPU and, where that is several, with one.

(a) and (b) hold their frames in memory; (c) can run longer than they do, on hard links to the
written frames (``--farm-frames``, ``--flow-farm-frames``), so its figure is the farm's steady state,
not its ramp-up.

The plate is a flat disc (about 0.15 MB a 1080p frame) unless ``--grain`` gives it film-like noise
(0.02: about 7.6 MB a frame, as real plates compress), which makes decoding it cost what it costs.

Run: python benchmarks/bench_passes.py [--frames 100] [--flow-frames 40] [--farm-frames 600]
     [--flow-farm-frames 120] [--grain 0.02] [--compression zips]
     [--skip depth,flow,c_graphs,c_gpu_decode,c_none,c_no_pools,flow_1]
     [--variant effort0:MLFARM_EXR_GPU_DEFLATE_EFFORT=0 --variant w3:workers=3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_farm import start, stop
from bench_sam2 import extend_plate, gpu_busy, srgb_frames, sync, write_plate


def depth_small(folder: Path, seed: int = 0) -> Path:
    """Depth Anything V2 small's configuration (24.8 M parameters), random, with its 518 processor."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518,
                            patch_size=14, out_indices=[3, 6, 9, 12], apply_layernorm=True,
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, patch_size=14,
                                 fusion_hidden_size=64, neck_hidden_sizes=[48, 96, 192, 384])
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(str(folder))
    DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                      ).save_pretrained(str(folder))
    return folder


def rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def depth_figures(torch, folder: Path, images: list[np.ndarray], device: str) -> dict[str, float]:
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    from mlfarm.models.builtin.depth.model import network_size

    net = DepthAnythingForDepthEstimation.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    proc = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    h, w = images[0].shape[:2]
    out: dict[str, float] = {}

    def naive() -> None:
        with torch.inference_mode():
            for im in images:
                inputs = proc(images=im, do_rescale=False, return_tensors="pt").to(device)
                pred = net(**inputs)
                proc.post_process_depth_estimation(pred, target_sizes=[(h, w)])[0]["predicted_depth"].cpu()

    naive()  # warm-up: cuDNN plans, allocator
    out["a"] = rate(len(images), naive)
    nh, nw = network_size(h, w, 518)
    mean = torch.tensor(proc.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, device=device).view(1, 3, 1, 1)
    gpu = [((torch.nn.functional.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].to(device), size=(nh, nw),
                                              mode="bicubic", antialias=True) - mean) / std) for im in images]
    for bf16 in (False, True):
        for batch in (1, 4, 8):
            groups = [torch.cat(gpu[i:i + batch]) for i in range(0, len(gpu) - batch + 1, batch)]

            def network(groups=groups, bf16=bf16) -> None:
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    for g in groups:
                        net(pixel_values=g)
                sync(torch, device)

            network(groups[:2])
            out[f"b_{'bf16' if bf16 else 'fp32'}_batch{batch}"] = rate(len(groups) * batch, network)
    with torch.inference_mode():
        fp32 = net(pixel_values=torch.cat(gpu[:4])).predicted_depth.float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = net(pixel_values=torch.cat(gpu[:4])).predicted_depth.float()
    span = (fp32.amax() - fp32.amin()).clamp_min(1e-12)
    out["bf16_max_diff_of_range"] = float((bf16 - fp32).abs().amax() / span)
    return out


def flow_figures(torch, weights: Path, images: list[np.ndarray], device: str) -> dict[str, float]:
    import torchvision.models.optical_flow as flow

    net = flow.raft_large(weights=None).to(device).eval()
    frames = [torch.from_numpy(im).permute(2, 0, 1).to(device) * 2 - 1 for im in images]
    pairs = list(zip(frames[:-1], frames[1:]))
    out: dict[str, float] = {}

    def naive() -> None:
        with torch.inference_mode():
            for a, b in pairs:
                net(a[None], b[None])[-1].cpu()

    naive_pairs = pairs[:8]
    with torch.inference_mode():
        net(naive_pairs[0][0][None], naive_pairs[0][1][None])
    out["a"] = rate(len(pairs), naive)
    for batch in (1, 4):
        groups = [(torch.stack([a for a, _ in pairs[i:i + batch]]), torch.stack([b for _, b in pairs[i:i + batch]]))
                  for i in range(0, len(pairs) - batch + 1, batch)]

        def network(groups=groups) -> None:
            with torch.inference_mode():
                for a, b in groups:
                    net(a, b)
            sync(torch, device)

        out[f"b_batch{batch}"] = rate(len(groups) * batch, network)
        torch.cuda.empty_cache()
    return out


def cpu_times() -> tuple[float, float]:
    """The host's (busy, total) CPU time so far, from /proc/stat (all cores): busy over a job is how
    much of the machine's cores the farm kept working."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def stage_totals(log: Path) -> dict[str, float]:
    """Seconds each stage took over every chunk in a worker's log (read, infer, write, cache, wall)."""
    import re

    totals: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r" in ([0-9.]+)s \((.*?)(?:, first frame|\))", line)
        if not m or "done (" not in line:
            continue
        totals["wall"] = totals.get("wall", 0.0) + float(m.group(1))
        for part in m.group(2).split(", "):
            name, _, secs = part.partition(" ")
            if secs.endswith("s"):
                totals[name] = totals.get(name, 0.0) + float(secs[:-1])
    return totals


def check_outputs(model: str, out: str, frames: list[int]) -> str:
    """Every tenth output decodes and holds together: for depth, the preview's grey is depth.Z
    normalised (mode inverse); for flow, finite vectors and an opaque preview. Planes compressed
    before the network's stream finished them would break this."""
    from mlfarm.exr.io import read_image
    from mlfarm.frames import frame_path

    worst = 0.0
    for f in frames[:: max(1, len(frames) // 10)]:
        image = read_image(frame_path(out, f))
        px = {c: image.pixels[..., i] for i, c in enumerate(image.channels)}
        assert np.all(px["A"] == 1), f"frame {f}: preview alpha is not 1"
        if model == "depth":
            z = px["depth.Z"]
            grey = (z - z.min()) / max(float(z.max() - z.min()), 1e-12)
            worst = max(worst, float(np.abs(grey - px["R"]).max()))
            assert worst < 2e-3, f"frame {f}: rgba is not depth.Z normalised (off by {worst})"
        else:
            for c in ("forward.u", "forward.v", "backward.u", "backward.v"):
                assert np.isfinite(px[c]).all(), f"frame {f}: {c} not finite"
    return f"outputs checked (preview against planes, largest difference {worst:.1e})"


def farm_rate(env: dict[str, str], tmp: Path, model: str, plate: str, frames: list[int], options: dict,
              per_gpu: int, logs: Path | None = None, profile: Path | None = None) -> float:
    """Frames/s of one job through ``per_gpu`` worker processes on GPU 0, each on its own share of the
    cores as `mlfarm worker --gpus` places them (a warm-up job first: loading is not counted)."""
    from bench_mrcnn import start_profile

    from mlfarm.client import Farm
    from mlfarm.cpus import format_cpus, split_cpus
    from mlfarm.settings import Settings

    shares = split_cpus(per_gpu) if per_gpu > 1 else [None]
    procs = []
    for i, share in enumerate(shares):
        cmd = [sys.executable, "-m", "mlfarm", "worker", "--queues", "gpu", "--name", f"{model}{i}@bench", "--gpu", "0"]
        if share:
            cmd += ["--cpus", format_cpus(share)]
        procs.append(start(cmd, env, tmp / f"{model}{i}.log", f"{model}{i}@bench ready.", 180))
    try:
        farm = Farm(Settings(), env["MLFARM_BROKER_URL"])
        result = 0.0
        chunk = Settings().default_chunk  # what `mlfarm submit` sends
        for run, todo in (("warm", frames[:chunk * 3 * per_gpu]), ("timed", frames)):
            spy = start_profile(str(profile / f"{model}-worker0.txt"), procs[0].pid, 6) if profile and run == "timed" \
                else None
            t, cpu0 = time.perf_counter(), cpu_times()
            spec = farm.submit(model, plate, str(tmp / "out" / model / run / "o.####.exr"), todo, options,
                               chunk=chunk, force=True)  # timed: never from the frame cache
            busy: list[float] = []
            while not (st := farm.status(spec.id)).finished:
                busy.append(gpu_busy())
                time.sleep(0.05)
            if st.state != "done":
                raise RuntimeError(f"{st.summary()}: {[f.reason for f in st.failed_frames[:2]]}\n"
                                   f"{(tmp / f'{model}0.log').read_text()[-4000:]}")
            result = len(todo) / (time.perf_counter() - t)
            cpu1 = cpu_times()
            samples = [b for b in busy[len(busy) // 5:] if b >= 0]
            if run == "timed" and samples:
                print(f"    {model}: GPU busy {np.mean(samples):.0f}% (NVML, {len(samples)} samples past the start); "
                      f"host cores busy {(cpu1[0] - cpu0[0]) / max(cpu1[1] - cpu0[1], 1e-9):.0%} "
                      f"({os.cpu_count()} cores, /proc/stat)", flush=True)
            print(f"    {model} {run}: {check_outputs(model, str(tmp / 'out' / model / run / 'o.####.exr'), todo)}",
                  flush=True)
            if spy is not None:
                spy.wait(60)
        for i in range(len(procs)):
            totals = stage_totals(tmp / f"{model}{i}.log")
            print(f"    {model} worker {i}: stage seconds over all its chunks (warm-up included): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items())), flush=True)
        return result
    finally:
        stop(procs)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for i in range(len(procs)):
                shutil.copy(tmp / f"{model}{i}.log", logs / f"{model}{i}.log")


def parse_variant(text: str) -> tuple[str, dict[str, str], int]:
    """``NAME:MLFARM_X=1,workers=3`` -> (NAME, {"MLFARM_X": "1"}, 3); workers 0: as (c)."""
    name, _, rest = text.partition(":")
    changes = dict(item.split("=", 1) for item in rest.split(",") if item)
    workers = int(changes.pop("workers", 0))
    if not name or any(not k.startswith("MLFARM_") for k in changes):
        raise SystemExit(f"--variant {text!r}: NAME:MLFARM_X=value,...[,workers=N]")
    return name, changes, workers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--flow-frames", type=int, default=40)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--farm-frames", type=int, default=0,
                    help="frames in depth's farm run (c): past --frames, hard links to the written frames")
    ap.add_argument("--flow-farm-frames", type=int, default=0, help="the same for flow's farm run")
    ap.add_argument("--grain", type=float, default=0.0, help="film-like noise on the plate (sigma; 0: none)")
    ap.add_argument("--compression", default="zip", help="the plate's EXR compression (zip: 16 lines a chunk; "
                    "zips: one, as Nuke writes by default)")
    ap.add_argument("--skip", default="")
    ap.add_argument("--workers-per-gpu", default="auto",
                    help="worker processes on the GPU (default auto: as `mlfarm worker --gpus` chooses)")
    ap.add_argument("--logs", default="", help="copy the workers' logs into this folder")
    ap.add_argument("--profile", default="", help="with py-spy installed: sample worker 0 into this folder")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:MLFARM_X=1,... (workers=N: N processes on the GPU): depth's job again with these")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.exr.common import can_decode
    from mlfarm.frames import frame_path
    from mlfarm.models.builtin.flow.weights import ARCHITECTURES

    skip = set(filter(None, args.skip.split(",")))
    from mlfarm.worker.supervisor import gpu_memory_gib, workers_per_gpu

    per_gpu, why = workers_per_gpu(args.workers_per_gpu, gpu_memory_gib(["0"]), len(os.sched_getaffinity(0)))
    print(f"(c) {per_gpu} worker process(es) on the GPU ({why})", flush=True)
    logs = Path(args.logs) if args.logs else None
    profile = Path(args.profile) if args.profile else None
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-passes-"))
    weights = tmp / "weights"
    weights.mkdir()
    depth_small(weights / "depth-anything-v2-small")
    torch.manual_seed(1)
    import torchvision.models.optical_flow as flow

    torch.save(flow.raft_large(weights=None).state_dict(), weights / ARCHITECTURES["raft_large"][0])
    frames = list(range(1001, 1001 + args.frames))
    plate = write_plate(tmp / "plate", frames, args.width, args.height, args.grain, args.compression)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    figures: dict[str, object] = {"device": name, "size": f"{args.width}x{args.height}", "grain": args.grain,
                                  "MB_a_frame": round(os.path.getsize(frame_path(plate, frames[0])) / 1e6, 2)}
    print(f"plate: {figures['MB_a_frame']} MB a frame (grain {args.grain}, {args.compression})", flush=True)
    server = EmbeddedRedis.start(tmp / "redis")
    env = {**os.environ, "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(tmp),
           "MLFARM_DATA_DIR": str(tmp / "data"), "MLFARM_WEIGHTS_DIR": str(weights),
           "MLFARM_CONFIG": str(tmp / "none.toml"), "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("MLFARM_")})
    try:
        if "depth" not in skip:
            images = srgb_frames(plate, frames)
            d = depth_figures(torch, weights / "depth-anything-v2-small", images, args.device)
            del images
            torch.cuda.empty_cache()
            farm = extend_plate(plate, frames, args.farm_frames)
            d["c"] = farm_rate(env, tmp, "depth", plate, farm, {"size": "small"}, per_gpu, logs, profile)
            if "c_graphs" not in skip:  # the network replayed as a CUDA graph per lane
                d["c_graphs"] = farm_rate({**env, "MLFARM_DEPTH_CUDA_GRAPHS": "true"}, tmp, "depth", plate, farm,
                                          {"size": "small"}, per_gpu)
                print(f"    depth (c_graphs) with MLFARM_DEPTH_CUDA_GRAPHS=true: {d['c_graphs']:.1f} fps", flush=True)
            if "c_gpu_decode" not in skip and can_decode(True, args.device):  # what decoding on the GPU is worth
                d["c_gpu_decode"] = farm_rate({**env, "MLFARM_EXR_GPU_DECODE": "true"}, tmp, "depth", plate, farm,
                                              {"size": "small"}, per_gpu)
                print(f"    depth (c_gpu_decode) with plates decoded on the GPU: {d['c_gpu_decode']:.1f} fps",
                      flush=True)
            if "c_no_pools" not in skip and can_decode(True, args.device):  # nvCOMP's own allocators
                d["c_no_pools"] = farm_rate({**env, "MLFARM_EXR_NVCOMP_POOLS": "false"}, tmp, "depth", plate, farm,
                                            {"size": "small"}, per_gpu)
                print(f"    depth (c_no_pools) with nvCOMP's own allocators: {d['c_no_pools']:.1f} fps", flush=True)
            if "c_none" not in skip:  # what compressing the outputs costs: written uncompressed instead
                d["c_none"] = farm_rate({**env, "MLFARM_EXR_COMPRESSION": "none"}, tmp, "depth", plate, farm,
                                        {"size": "small"}, per_gpu)
                print(f"    depth (c_none) with outputs written uncompressed: {d['c_none']:.1f} fps", flush=True)
            for name, changes, workers in map(parse_variant, args.variant):
                d[f"c_{name}"] = farm_rate({**env, **changes}, tmp, "depth", plate, farm, {"size": "small"},
                                           workers or per_gpu)
                print(f"    depth (c_{name}) with {changes or ''} {f'{workers} processes' if workers else ''}: "
                      f"{d[f'c_{name}']:.1f} fps", flush=True)
            best = max(v for k, v in d.items() if k.startswith("b_"))
            c = max(d["c"], d.get("c_graphs", 0.0), d.get("c_gpu_decode", 0.0))  # the better setting
            print(f"depth (a) naive {d['a']:.1f} fps; (b) network " + ", ".join(
                f"{k[2:]} {v:.1f}" for k, v in d.items() if k.startswith("b_")) + f"; (c) mlfarm {c:.1f} fps; "
                f"(c)/(b best) {c / best:.2f}x, (c)/(a) {c / d['a']:.2f}x; bf16 changes depth by at most "
                f"{d['bf16_max_diff_of_range']:.2%} of its range", flush=True)
            figures["depth"] = d
        if "flow" not in skip:
            ff = frames[:args.flow_frames]
            images = srgb_frames(plate, ff)
            f = flow_figures(torch, weights, images, args.device)
            del images
            torch.cuda.empty_cache()
            farm = extend_plate(plate, ff, args.flow_farm_frames)
            fps = farm_rate(env, tmp, "flow", plate, farm, {"arch": "raft_large"}, per_gpu, logs, profile)
            pairs_a_frame = (2 * len(farm) - 2) / len(farm)  # forward and backward; the ends have one
            f["c_pairs"] = fps * pairs_a_frame
            if per_gpu > 1 and "flow_1" not in skip:  # one process: RAFT alone on the GPU, all its memory for batches
                one = farm_rate(env, tmp, "flow", plate, farm, {"arch": "raft_large"}, 1)
                f["c1_pairs"] = one * pairs_a_frame
                print(f"    flow (c) with 1 worker process: {f['c1_pairs']:.2f} pairs/s", flush=True)
            best = max(v for k, v in f.items() if k.startswith("b_"))
            print(f"flow (a) naive {f['a']:.2f} pairs/s; (b) network " + ", ".join(
                f"{k[2:]} {v:.2f}" for k, v in f.items() if k.startswith("b_")) + f"; (c) mlfarm {f['c_pairs']:.2f} "
                f"pairs/s ({fps:.2f} frames/s, {per_gpu} process(es)); (c)/(b best) "
                f"{max(f['c_pairs'], f.get('c1_pairs', 0.0)) / best:.2f}x (the better)", flush=True)
            figures["flow"] = f
    finally:
        server.stop()
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
