"""SAM 2.1 video segmentation at 1080p on the GPU: the farm against the library's own loop and the network.

All in one run, same weights (SAM 2.1 base-plus's configuration, randomly initialised with a fixed
seed and saved with ``save_pretrained``, since the GPU machine has no internet), same plate, one
box-prompted object on the first frame. The prompt box covers a fifth of the frame around a moving
disc; with random weights the masks are whatever the network makes of it, and the run prints their
mean area so the figures can be read against realistic mask sizes.

(a) reference  transformers' own video propagation example: the frames in memory (decoded from the
               EXR plate and converted to sRGB beforehand, not timed), ``init_video_session(video=...)``,
               the box on frame 0, ``propagate_in_video_iterator``, each frame's masks resized to the
               plate (``post_process_masks``) and copied to the host. fp32, and bf16 autocast.
(b) network    the streaming session alone on GPU-resident preprocessed frames: one
               ``model(inference_session, frame)`` per frame, nothing copied back; fp32 and bf16.
               Also its GPU memory over the run (flat: the plugin prunes what SAM 2 no longer reads).
               The farm runs also print the workers' resident memory by frames done (a long shot:
               ``--frames 2000``; on the CPU with ``--tiny`` that is where the state lives).
(b_streams)    the plugin's own step (GPU-side preprocessing, the encoder's CUDA graph), one shot and
               --shots shots at once on their own threads and streams: the ceiling for (c) and (c4).
(c) farm       EXR plate on disk -> Farm.submit (what `mlfarm submit --prompt` calls) -> one GPU worker
               process -> EXR planes (rgba, matte.A, instance.id, <name>.A) + sidecar JSON on disk.
(c4)           four shots submitted at once on the one GPU: one worker process running four streams
               (MLFARM_WORKER_THREADS=4), and four worker processes on the GPU.

Run: python benchmarks/bench_sam2.py [--frames 200] [--device cuda]
Needs a CUDA GPU for real figures (``--device cpu --width 160 --height 96 --frames 6 --tiny`` checks
the script itself on a tiny random model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
from bench_farm import start, stop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def base_plus(folder: Path, seed: int = 0) -> Path:
    """SAM 2.1 hiera base-plus's configuration (80.9 M parameters), random weights, 1024 input."""
    import torch
    from transformers import (
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoVideoProcessor,
        Sam2VisionConfig,
    )

    backbone = Sam2HieraDetConfig(hidden_size=112, embed_dim_per_stage=[112, 224, 448, 896],
                                  num_attention_heads_per_stage=[2, 4, 8, 16], blocks_per_stage=[2, 3, 16, 3],
                                  global_attention_blocks=[12, 16, 20],
                                  window_positional_embedding_background_size=[14, 14])
    vision = Sam2VisionConfig(backbone_config=backbone, backbone_channel_list=[896, 448, 224, 112])
    torch.manual_seed(seed)
    Sam2VideoModel(Sam2VideoConfig(vision_config=vision)).eval().save_pretrained(str(folder))
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(), video_processor=Sam2VideoVideoProcessor()
                       ).save_pretrained(str(folder))
    return folder


def disc_frame(f: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 4), np.float32)
    img[..., 0] = 0.1 + 0.2 * x / width
    img[..., 1] = 0.12 + 0.15 * y / height
    img[..., 2] = 0.2
    img[..., 3] = 1
    cx, cy = width * (0.3 + 0.4 * ((f % 100) / 99)), height * 0.5
    disc = (x - cx) ** 2 + (y - cy) ** 2 < (0.16 * height) ** 2
    img[disc, :3] = (2.0, 1.2, 0.4)
    return img


def write_plate(folder: Path, frames: list[int], width: int, height: int, grain: float = 0.0,
                compression: str = "zip") -> str:
    """``grain``: the sigma of film-like noise on the colour channels (0: the flat disc, about 0.15 MB a
    1080p frame; 0.02: about 7.6 MB, as a plate shot on film or a sensor compresses)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in frames:
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.attribute("compression", compression)
        pixels = disc_frame(f, width, height)
        if grain:
            pixels[..., :3] += rng.normal(0, grain, (height, width, 3)).astype(np.float32)
        out = oiio.ImageOutput.create(str(folder / f"plate.{f:04d}.exr"))
        out.open(str(folder / f"plate.{f:04d}.exr"), spec)
        out.write_image(pixels)
        out.close()
    return str(folder / "plate.####.exr")


def extend_plate(plate: str, written: list[int], total: int) -> list[int]:
    """The plate's frames, ``total`` of them: frames past the written ones are hard links to those, in
    turn. The farm's timed runs last long enough to reach their steady state without writing (or
    holding in memory for (a) and (b)) more 1080p frames; reading a link costs what reading its frame does."""
    from mlfarm.frames import frame_path

    frames = [written[0] + i for i in range(max(total, len(written)))]
    for i, f in enumerate(frames[len(written):], start=len(written)):
        link = frame_path(plate, f)
        if not os.path.exists(link):
            os.link(frame_path(plate, written[i % len(written)]), link)
    return frames


def prompt_box(first: int, width: int, height: int) -> list[float]:
    """A box of a fifth of the frame's area around the disc on the first frame."""
    cx, cy = width * (0.3 + 0.4 * ((first % 100) / 99)), height * 0.5
    w, h = width * 0.447, height * 0.447
    return [max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(width, cx + w / 2), min(height, cy + h / 2)]


def srgb_frames(plate: str, frames: list[int]) -> list[np.ndarray]:
    from mlfarm.exr.io import read_image
    from mlfarm.frames import frame_path
    from mlfarm.models.colour import linear_to_srgb

    return [np.clip(linear_to_srgb(read_image(frame_path(plate, f)).rgba(3), np), 0, 1).astype(np.float32)
            for f in frames]


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- (a) the library's own loop ---------------------------------------------------------------
def reference_fps(torch, folder: Path, images: list[np.ndarray], box: list[float], device: str, bf16: bool
                  ) -> tuple[float, float]:
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    model = Sam2VideoModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    proc = Sam2VideoProcessor.from_pretrained(str(folder), local_files_only=True)
    h, w = images[0].shape[:2]
    session = proc.init_video_session(video=[(im * 255).astype(np.uint8) for im in images],
                                      inference_device=device, dtype=torch.float32)
    proc.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=[1], input_boxes=[[box]])
    areas = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.startswith("cuda"))
    with autocast:
        model(inference_session=session, frame_idx=0)  # the prompted frame first, as the example does
    sync(torch, device)
    t = time.perf_counter()
    with autocast:
        for out in model.propagate_in_video_iterator(session):
            masks = proc.post_process_masks([out.pred_masks], original_sizes=[[h, w]], binarize=False)[0]
            host = (masks > 0).cpu()
            areas.append(float(host.float().mean()))
    sync(torch, device)
    fps = len(images) / (time.perf_counter() - t)
    del model, session
    return fps, float(np.mean(areas))


# --- (b) the network alone -----------------------------------------------------------------------
def network_fps(torch, folder: Path, images: list[np.ndarray], box: list[float], device: str, bf16: bool
                ) -> tuple[float, list[float]]:
    from mlfarm.models.builtin.sam2.tracker import Sam2Tracker

    tracker = Sam2Tracker(folder, device, "bfloat16" if bf16 else "float32")
    proc = tracker.processor
    h, w = images[0].shape[:2]
    pixels = [proc(images=torch.from_numpy(im).permute(2, 0, 1), do_rescale=False, return_tensors="pt"
                   ).pixel_values[0].to(device, tracker.dtype) for im in images]
    session = tracker.session()
    state = session.state
    memory = []
    with torch.inference_mode():
        state.add_new_frame(pixels[0], frame_idx=0)
        proc.add_inputs_to_inference_session(state, frame_idx=0, obj_ids=[1], input_boxes=[[box]],
                                             original_size=[h, w])
        tracker.model(inference_session=state, frame=pixels[0], frame_idx=0)
        session._prune(0)
        sync(torch, device)
        t = time.perf_counter()
        for k in range(1, len(pixels)):
            tracker.model(inference_session=state, frame=pixels[k], frame_idx=k)
            session._prune(k)
            if device.startswith("cuda") and k % 25 == 0:
                memory.append(torch.cuda.memory_allocated() / 2**30)
        sync(torch, device)
    return (len(pixels) - 1) / (time.perf_counter() - t), memory


def sessions_fps(torch, folder: Path, images: list[np.ndarray], box: list[float], device: str, bf16: bool,
                 shots: int) -> tuple[float, float]:
    """The plugin's own streaming step (``Session.step``: GPU-side resize and normalisation, the CUDA
    graph of the image encoder, masks at plate size left on the GPU) for ``shots`` shots at once, each
    on its own thread and CUDA stream as the worker's lanes run them, frames already on the GPU.

    The ceiling for (c) (one shot) and (c4) (``shots`` in one process): frames/s over all shots, and
    the GPU's mean busy percentage (NVML) meanwhile."""
    import threading

    from mlfarm.models.builtin.sam2.tracker import Sam2Tracker
    from mlfarm.prompts import from_json

    tracker = Sam2Tracker(folder, device, "bfloat16" if bf16 else "float32")
    prompts = list(from_json([{"frame": 0, "object": 1, "name": "disc", "box": box}]).keys)
    frames = [torch.from_numpy(im).to(device) for im in images]
    gate = threading.Barrier(shots + 1)
    errors: list[BaseException] = []
    ends: list[float] = []

    def shot() -> None:
        stream = torch.cuda.Stream() if device.startswith("cuda") else None
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                session = tracker.session()
                for warm in range(3):  # the prompted frame, then the graph's warm call and its capture
                    session.step(frames[warm], prompts if warm == 0 else ())
                sync(torch, device)
                gate.wait()
                for im in frames[3:]:
                    session.step(im)
                sync(torch, device)
                ends.append(time.perf_counter())
        except BaseException as e:  # reported after the join
            errors.append(e)
            gate.abort()

    threads = [threading.Thread(target=shot, daemon=True) for _ in range(shots)]
    for th in threads:
        th.start()
    gate.wait()
    t = time.perf_counter()
    busy = []
    while any(th.is_alive() for th in threads):
        busy.append(gpu_busy())
        time.sleep(0.25)
    if errors:
        raise errors[0]
    elapsed = max(ends) - t
    samples = [b for b in busy[len(busy) // 5:] if b >= 0]
    return shots * (len(images) - 3) / elapsed, float(np.mean(samples)) if samples else -1.0


# --- (c) through the farm ---------------------------------------------------------------------------
def gpu_busy() -> float:
    """The GPU's utilisation over NVML's last sample period (percent), or -1 where NVML is not there."""
    try:
        import torch

        return float(torch.cuda.utilization(0))
    except Exception:
        return -1.0


def workers_rss_mib() -> float:
    """The resident memory of this process's worker children (Redis excluded), in MiB: flat over a
    long shot when the sequence holds only what it still needs."""
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if "redis" not in child.name():
                total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def farm_fps(env: dict[str, str], tmp: Path, plate: str, frames: list[int], box: list[float], shots: int,
             size: str, name: str) -> tuple[float, float]:
    """Frames/s of ``shots`` jobs submitted at once (all frames of all shots over the wall time), and the
    mean matte area of the first shot's outputs."""
    from mlfarm.client import Farm
    from mlfarm.exr.io import read_image
    from mlfarm.frames import frame_path
    from mlfarm.prompts import from_json
    from mlfarm.settings import Settings

    farm = Farm(Settings(), env["MLFARM_BROKER_URL"])
    prompts = from_json([{"frame": frames[0], "object": 1, "name": "disc", "box": box}])
    outs = [str(tmp / "out" / name / f"s{i}" / "seg.####.exr") for i in range(shots)]
    busy: list[float] = []
    memory: list[tuple[int, float]] = []  # (frames done, the workers' resident memory in MiB)
    t = time.perf_counter()
    specs = [farm.submit("sam2", plate, out, frames, {"size": size}, prompts=prompts, name=f"bench {i}",
                          force=True)  # four copies of one shot: each renders, none from the frame cache
             for i, out in enumerate(outs)]
    while True:
        states = [farm.status(s.id) for s in specs]
        if all(st.finished for st in states):
            break
        busy.append(gpu_busy())
        memory.append((sum(st.counts["done"] for st in states), workers_rss_mib()))
        time.sleep(0.25)
    elapsed = time.perf_counter() - t
    if len(frames) >= 100 and memory:
        marks = [memory[min(len(memory) - 1, int(len(memory) * q))] for q in (0.1, 0.25, 0.5, 0.75)] + [memory[-1]]
        print("    worker memory (resident, MiB) by frames done: " +
              ", ".join(f"{mib:.0f} at {done}" for done, mib in marks), flush=True)
    samples = [b for b in busy[len(busy) // 5:] if b >= 0]  # past the start: the streams' steady state
    if samples:
        print(f"    GPU busy {np.mean(samples):.0f}% (mean of {len(samples)} samples, NVML)", flush=True)
    for st in states:
        if st.state != "done":
            raise RuntimeError(f"{st.summary()}: " + "; ".join(fs.reason for fs in st.failed_frames[:3]))
    areas = []
    for f in frames[:: max(1, len(frames) // 10)]:
        image = read_image(frame_path(outs[0], f))
        px = {c: image.pixels[..., i] for i, c in enumerate(image.channels)}
        assert np.array_equal(px["matte.A"], (px["instance.id"] > 0).astype(np.float32))
        areas.append(float(px["matte.A"].mean()))
    return shots * len(frames) / elapsed, float(np.mean(areas))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--farm-frames", type=int, default=0,
                    help="frames a shot in the farm runs (c, c4): past --frames, hard links to the written frames")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of base-plus (script check)")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: a,b,b_streams,c,c_eager,c4,c4_threads,c4_2x2")
    ap.add_argument("--json", default="", help="write the figures to this file too")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.cpus import format_cpus, split_cpus

    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="bench-sam2-"))
    device = args.device
    size = "tiny" if args.tiny else "base-plus"
    weights = tmp / "weights"
    folder = weights / f"sam2.1-hiera-{size}"
    t = time.perf_counter()
    if args.tiny:
        from tiny_models import sam2_video

        sam2_video(folder, image_size=64)
    else:
        base_plus(folder)
    print(f"weights: SAM 2.1 {size} configuration, random, saved in {time.perf_counter() - t:.1f}s", flush=True)
    frames = list(range(1001, 1001 + args.frames))
    t = time.perf_counter()
    plate = write_plate(tmp / "plate", frames, args.width, args.height)
    print(f"plate: {len(frames)} frames {args.width}x{args.height} half/zip in {time.perf_counter() - t:.1f}s",
          flush=True)
    box = prompt_box(frames[0], args.width, args.height)
    figures: dict[str, object] = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                                  "frames": len(frames), "size": f"{args.width}x{args.height}", "model": size}
    images = srgb_frames(plate, frames) if not {"a", "b", "b_streams"} <= skip else []
    bf16_ok = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    for bf16 in ([False, True] if bf16_ok else [False]):
        tag = "bf16" if bf16 else "fp32"
        if "a" not in skip:
            fps, area = reference_fps(torch, folder, images, box, device, bf16)
            figures[f"a_{tag}"] = round(fps, 2)
            print(f"(a) reference loop {tag}: {fps:.2f} frames/s (mean mask area {area:.1%} of the frame)",
                  flush=True)
            torch.cuda.empty_cache() if device.startswith("cuda") else None
        if "b" not in skip:
            fps, memory = network_fps(torch, folder, images, box, device, bf16)
            figures[f"b_{tag}"] = round(fps, 2)
            flat = f", GPU memory {memory[0]:.2f} -> {memory[-1]:.2f} GiB over the run" if memory else ""
            print(f"(b) network alone {tag}: {fps:.2f} frames/s{flat}", flush=True)
            torch.cuda.empty_cache() if device.startswith("cuda") else None
    if "b_streams" not in skip:  # the plugin's step, 1 and --shots shots at once: (c)'s and (c4)'s ceiling
        for shots in (1, args.shots):
            fps, busy = sessions_fps(torch, folder, images, box, device, bf16_ok, shots)
            figures[f"b_streams{shots}"] = round(fps, 2)
            print(f"(b_streams) plugin step, {shots} shot(s) on {shots} thread(s) and stream(s), "
                  f"{'bf16' if bf16_ok else 'fp32'}: {fps:.2f} frames/s (GPU busy {busy:.0f}%)", flush=True)
            torch.cuda.empty_cache() if device.startswith("cuda") else None
    del images

    server = EmbeddedRedis.start(tmp / "redis")
    base_env = {**os.environ, "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(tmp),
                "MLFARM_DATA_DIR": str(tmp / "data"), "MLFARM_WEIGHTS_DIR": str(weights),
                "MLFARM_DEVICE": device if device == "cpu" else "auto", "MLFARM_CONFIG": str(tmp / "none.toml"),
                "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: v for k, v in base_env.items() if k.startswith("MLFARM_")})  # this process submits
    farm_frames = extend_plate(plate, frames, args.farm_frames)
    print(f"farm runs: {len(farm_frames)} frames a shot", flush=True)
    variants = [("c", 1, {}, 1)]
    if "c_eager" not in skip:  # the image encoder without its CUDA graph: what the graph is worth
        variants += [("c_eager", 1, {"MLFARM_SAM2_CUDA_GRAPHS": "false"}, 1)]
    if "c4" not in skip:
        if "c4_threads" not in skip:
            variants += [("c4_threads", args.shots, {"MLFARM_WORKER_THREADS": str(args.shots),
                                                     "MLFARM_SAM2_LANES": str(args.shots)}, 1)]
        if "c4_2x2" not in skip and args.shots % 2 == 0:  # two processes, each stepping half the shots at once
            half = str(args.shots // 2)
            variants += [("c4_2x2", args.shots, {"MLFARM_WORKER_THREADS": half, "MLFARM_SAM2_LANES": half}, 2)]
        variants += [("c4_processes", args.shots, {"MLFARM_WORKER_THREADS": "1"}, args.shots)]
    try:
        for name, shots, extra, processes in variants:
            if name == "c" and "c" in skip:
                continue
            env = {**base_env, **extra}
            procs = []
            try:
                # As `mlfarm worker --gpus` places several processes on a GPU: each on its own share of the cores.
                shares = split_cpus(processes) if processes > 1 else [None]
                for i in range(processes):
                    cmd = [sys.executable, "-m", "mlfarm", "worker", "--queues", "gpu", "--name", f"{name}{i}@bench"]
                    if device.startswith("cuda"):
                        cmd += ["--gpu", "0"]
                    if shares[i]:
                        cmd += ["--cpus", format_cpus(shares[i])]
                    procs.append(start(cmd, env, tmp / f"{name}{i}.log", f"{name}{i}@bench ready.", 180))
                # Every process and lane loads the model and captures its graphs before the timed run.
                farm_fps(env, tmp, plate, frames[:min(len(frames), 8)], box, shots, size, f"{name}-warm")
                fps, area = farm_fps(env, tmp, plate, farm_frames, box, shots, size, name)
                figures[name] = round(fps, 2)
                print(f"({name}) mlfarm, {shots} shot(s), {processes} process(es): {fps:.2f} frames/s "
                      f"(mean matte area {area:.1%})", flush=True)
            except Exception:
                for log in sorted(tmp.glob(f"{name}*.log")):
                    print(f"--- {log.name} (last lines)\n{log.read_text(errors='replace')[-6000:]}", flush=True)
                raise
            finally:
                stop(procs)
    finally:
        server.stop()
    ref = figures.get("a_bf16", figures.get("a_fp32"))
    if "c" in figures and ref:
        print(f"(c)/(a) {figures['c'] / ref:.2f}x against the reference at the worker's precision", flush=True)
    for key in ("c4_threads", "c4_2x2", "c4_processes"):
        if key in figures and "c" in figures:
            print(f"({key})/(c) {figures[key] / figures['c']:.2f}x", flush=True)
    print(json.dumps(figures), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
