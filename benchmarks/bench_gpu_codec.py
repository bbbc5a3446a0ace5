"""EXRs decoded and encoded on the GPU: nvCOMP's own allocators against the pools mlfarm lends it.

One run, same files, same GPU, two child processes that differ only in where nvCOMP's working memory
comes from (``mlfarm/exr/nvcomp_memory.py``):

- baseline ``nvcomp``: nvCOMP's own allocators (``cudaMalloc``/``cudaFree`` and pinned
  ``cudaMallocHost``/``cudaFreeHost`` each call; a free waits for the whole GPU);
- ``pools``: torch's caching allocator and mlfarm's pinned pool (``nvcomp_memory.install``).

Each child times, on 1 thread and on ``--threads`` threads (each thread on its own stream, as a
worker's I/O threads are):

- decode: ``read_image(half=True, device="cuda")`` of a grainy 1080p RGBA half plate (page cache);
- encode: ``write_zips`` of depth's two output planes (``depth.Z`` float, ``rgba`` half) to /dev/shm;
- both beside a network: a bf16 convolution stack running in a loop on its own stream, as the model's
  lane does, timed alone and while the threads decode and encode: what the codec costs the network.

Figures are frames/s (network: iterations/s) and ratios of ``pools`` to ``nvcomp`` in this run.

Run: python benchmarks/bench_gpu_codec.py [--frames 24] [--threads N] [--compression zips]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rate(fn, items: list, threads: int, seconds: float = 3.0) -> float:
    """Items/s of ``fn`` over ``items`` (cycled) on ``threads`` threads for about ``seconds``."""
    done = 0
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def work(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            fn(items[i % len(items)])
            i += threads
            with lock:
                done += 1

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    return done / (time.perf_counter() - t)


class Network:
    """A bf16 convolution stack in a loop on its own stream: the model's lane, roughly."""

    def __init__(self, torch):
        self.torch = torch
        layers = []
        for _ in range(6):
            layers += [torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers).cuda().eval()
        self.x = torch.randn(8, 64, 128, 128, device="cuda")
        self.stream = torch.cuda.Stream()
        self.running = False
        self.iterations = 0

    def step(self) -> None:
        torch = self.torch
        with torch.cuda.stream(self.stream), torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            self.net(self.x)
        self.stream.synchronize()

    def rate(self, seconds: float, beside=None) -> tuple[float, float]:
        """Iterations/s alone, or while ``beside()`` runs (returning its own figure)."""
        self.running, self.iterations = True, 0

        def loop() -> None:
            while self.running:
                self.step()
                self.iterations += 1

        for _ in range(3):
            self.step()
        worker = threading.Thread(target=loop)
        t = time.perf_counter()
        worker.start()
        other = beside() if beside else (time.sleep(seconds) or 0.0)
        self.running = False
        worker.join()
        return self.iterations / (time.perf_counter() - t), other


def child(args) -> dict:
    import torch

    from mlfarm.exr import gpu, nvcomp_memory
    from mlfarm.exr.io import read_image

    if args.variant == "nvcomp":
        os.environ["MLFARM_EXR_NVCOMP_POOLS"] = "false"  # nvCOMP keeps its own allocators
    paths = json.loads(Path(args.paths).read_text())
    first = read_image(paths[0], half=True, device="cuda").pixels
    assert first.is_cuda
    torch.cuda.synchronize()
    height, width = first.shape[:2]
    out = Path(tempfile.mkdtemp(prefix="bench-codec-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    depth = torch.rand(height, width, device="cuda")
    rgba = torch.rand(height, width, 4, device="cuda").half()
    planes = [("depth.Z", depth)] + [(c, rgba[..., i]) for i, c in enumerate("RGBA")]
    torch.cuda.synchronize()

    def decode(path: str) -> None:
        read_image(path, half=True, device="cuda")

    def encode(k: int) -> None:
        gpu.write_zips(str(out / f"out.{k % 64:04d}.exr"), out, planes, {})

    def both(path_k) -> None:
        decode(path_k[0])
        encode(path_k[1])

    figures: dict[str, float] = {}
    for n in sorted({1, args.threads}):
        figures[f"decode {n}"] = rate(decode, paths, n)
        figures[f"encode {n}"] = rate(encode, list(range(64)), n)
    net = Network(torch)
    figures["network alone"], _ = net.rate(3.0)
    pairs = [(p, k) for k, p in enumerate(paths)]
    figures["network beside"], figures[f"decode+encode {args.threads} beside"] = net.rate(
        0.0, lambda: rate(both, pairs, args.threads))
    figures["pools"] = nvcomp_memory.stats()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0, help="threads for the parallel figures (0: the usable cores)")
    ap.add_argument("--compression", default="zips", help="the plate's: zips (Nuke's default) or zip")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from mlfarm.cpus import available_cpus

    args.threads = args.threads or len(available_cpus())
    if args.variant:
        print(json.dumps(child(args)), flush=True)
        return
    from bench_read import grainy_plate

    from mlfarm.exr.common import can_decode

    if not can_decode(True, "cuda"):
        sys.exit("bench_gpu_codec needs a CUDA GPU and nvCOMP (nvidia-nvcomp-cu13)")
    folder = Path(tempfile.mkdtemp(prefix="bench-codec-plate-"))
    paths = grainy_plate(folder, args.frames, 1920, 1080, args.compression)
    (folder / "paths.json").write_text(json.dumps(paths))
    size = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
    print(f"plate: {len(paths)} frames 1920x1080 RGBA half {args.compression} with grain, {size:.1f} MB a frame; "
          f"{args.threads} threads", flush=True)
    results = {}
    for variant in ("nvcomp", "pools"):
        command = [sys.executable, "-X", "faulthandler", __file__, "--variant", variant, "--paths",
                   str(folder / "paths.json"), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{variant}: rc {done.returncode}\n{done.stderr[:4000]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", flush=True)
    base, pools = results["nvcomp"], results["pools"]
    for name in base:
        if name == "pools":
            continue
        unit = "iterations/s" if name.startswith("network") else "frames/s"
        print(f"{name:32s} nvcomp {base[name]:8.1f}  pools {pools[name]:8.1f} {unit}  "
              f"{pools[name] / base[name]:5.2f}x", flush=True)
    print(f"pools lent: {pools['pools']}")


if __name__ == "__main__":
    main()
