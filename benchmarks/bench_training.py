"""Training and trained-model throughput, against bare PyTorch baselines in the same run.

Training: the farm's loop (models/training/loop.py: batches cut from images in host memory,
CSV + TensorBoard log, progress hooks, validation and a checkpoint every epoch) against two bare
loops on the same network, crops, batch size and optimiser:
  bare-host    the same crops cut on the host and copied to the device each step, nothing else;
  bare-device  every batch prepared on the device before timing (the ceiling: pure compute).
Inference: a 1920x1080 RGBA frame through the trained model as a worker runs it (TrainedImg2Img:
numpy in, numpy out, alpha passed through) against the bare network on a tensor already on the device.

Per device (CPU, and CUDA where there is one) it prints steps/s or frames/s and ratios.

Run: .venv/bin/python benchmarks/bench_training.py [--steps N] [--crop C] [--batch B] [--features F] [--repro]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
import torch
import torch.nn.functional as F

from mlfarm.models.training.checkpoints import load_checkpoint
from mlfarm.models.training.data import epoch_batches, scan, steps_per_epoch
from mlfarm.models.training.logs import read_log
from mlfarm.models.training.loop import Images, Trainer
from mlfarm.models.training.networks import build_network
from mlfarm.models.training.runs import TrainConfig, list_checkpoints, run_dir
from mlfarm.models.training.trained import model_class


def write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w, c = pixels.shape
    out = oiio.ImageOutput.create(str(path))
    out.open(str(path), oiio.ImageSpec(w, h, c, oiio.FLOAT))
    out.write_image(pixels)
    out.close()


def make_data(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    gain = np.array([0.6, 0.9, 1.2], np.float32)
    for split, count in (("train", n), ("val", 2)):
        for i in range(count):
            img = rng.random((size, size, 3), dtype=np.float32) * 0.8
            write(root / split / "input" / f"{i:03d}.exr", img)
            write(root / split / "groundtruth" / f"{i:03d}.exr", img * gain)
    return root


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare(config: TrainConfig, device: str, steps: int, on_device: bool) -> float:
    """Steps/s of a loop that only trains (same crops as the farm loop's first epochs)."""
    data = scan(config.data, "img2img", config.crop)
    images = Images(data, "train")
    per_epoch = steps_per_epoch(len(images), config.batch, config.crops_per_image)
    plan = [b for e in range(1, steps // per_epoch + 2)
            for b in epoch_batches(images.sizes, config.crop, config.batch, config.crops_per_image, config.seed, e)]
    torch.manual_seed(config.seed)
    net = build_network("img2img", config.features).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    batches = [images.batch(plan[i], config.crop, device) for i in range(steps)] if on_device else None

    def step(i: int) -> None:
        x, y = batches[i] if batches else images.batch(plan[i], config.crop, device)
        loss = F.l1_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(min(5, steps)):  # warm-up: kernels chosen, allocator primed
        step(i)
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(device)
    return steps / (time.perf_counter() - t)


def farm_loop(config: TrainConfig, storage: Path, device: str) -> tuple[float, int]:
    """Steps/s from the run's own log timestamps: loading the images and the first step are left out,
    as the bare loops leave out theirs; checkpoints and validations in between are counted."""
    progress = Trainer(config, storage, device, checkpoint_interval=1e9).run()
    times = [float(r["time"]) for r in read_log(run_dir(storage, config.name))]
    return (len(times) - 1) / (times[-1] - times[0]), progress.step


def reproducible(config: TrainConfig, storage: Path, device: str) -> bool:
    """Two runs with one seed on this device: the same weights, bit for bit?"""
    finals = []
    for name in ("repro_a", "repro_b"):
        cfg = TrainConfig.from_dict({**config.to_dict(), "name": name, "epochs": 2})
        Trainer(cfg, storage, device).run()
        finals.append(load_checkpoint(list_checkpoints(run_dir(storage, name))[-1][1]).weights)
    return all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def inference(storage: Path, name: str, device: str, frames: int) -> tuple[float, float]:
    model = model_class(run_dir(storage, name))()
    model.load(device)
    rng = np.random.default_rng(1)
    frame = rng.random((1080, 1920, 4), dtype=np.float32)
    model.infer_batch([[frame]])  # loads the weights, warms up
    t = time.perf_counter()
    for _ in range(frames):
        model.infer_batch([[frame]])
    plugin = frames / (time.perf_counter() - t)
    net = model._network()
    x = torch.from_numpy(np.ascontiguousarray(frame[..., :3].transpose(2, 0, 1)))[None].to(device)
    with torch.inference_mode():
        net.run_frame(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(frames):
            net.run_frame(x)
        sync(device)
    return plugin, frames / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0, help="Training steps per measurement (default: per device).")
    parser.add_argument("--crop", type=int, default=0, help="Crop size (default: 128 on CPU, 256 on CUDA).")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--frames", type=int, default=0, help="1080p frames for inference (default: per device).")
    parser.add_argument("--repro", action="store_true", help="Also train twice with one seed and compare weights.")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA"))
    for device in devices:
        gpu = device == "cuda"
        crop = args.crop or (256 if gpu else 128)
        steps = args.steps or (400 if gpu else 40)
        frames = args.frames or (50 if gpu else 3)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data = make_data(root / "data", 16, crop + 64)
            per_epoch = 50 if gpu else 10  # each epoch ends with a validation and a checkpoint
            config = TrainConfig(name="bench", template="img2img", data=str(data), epochs=max(1, steps // per_epoch),
                                 batch=args.batch, lr=1e-3, crop=crop, seed=0,
                                 crops_per_image=per_epoch * args.batch // 16, features=args.features)
            host = bare(config, device, steps, on_device=False)
            ceiling = bare(config, device, steps, on_device=True)
            farm, done = farm_loop(config, root / "storage", device)
            print(f"\n[{device}] img2img, batch {args.batch} x {crop}x{crop}, {args.features} features, "
                  f"{per_epoch} steps/epoch")
            print(f"  bare-device  {ceiling:8.1f} steps/s")
            print(f"  bare-host    {host:8.1f} steps/s   ({host / ceiling:.2f} x bare-device)")
            print(f"  farm loop    {farm:8.1f} steps/s   ({farm / host:.2f} x bare-host, {farm / ceiling:.2f} x "
                  f"bare-device; {done} steps incl. {done // per_epoch} checkpoints + validations)")
            plugin, raw = inference(root / "storage", "bench", device, frames)
            print(f"  1080p inference: plugin {plugin:.2f} frames/s, bare network {raw:.2f} frames/s "
                  f"({plugin / raw:.2f} x)")
            if args.repro:
                print(f"  same seed twice, same weights bit for bit: {reproducible(config, root / 'storage', device)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
