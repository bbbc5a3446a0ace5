"""Mask R-CNN at 1080p on the GPU: the farm against a script loop and against the network alone.

All in one run, same weights (torchvision's maskrcnn_resnet50_fpn, randomly initialised with a fixed
seed and saved to a file, since the GPU machine has no internet), same frames, same detection count:
the score threshold is calibrated on frames across the plate's 100-frame cycle so the heads keep
well over 20 detections on every frame, and every side caps at 20.

(a) naive   the typical script: per frame, upload, ``model([img])``, every output to the host
            (all N full-frame float masks included). sRGB conversion is done beforehand, not timed.
(b) network the network alone on GPU-resident frames: transform, backbone, RPN, box and mask heads,
            no mask paste; batch 1 (as the issue measured it) and the worker's batch size; batch 1 is
            measured again after the farm runs and (c) compared with the mean of both. Built as
            torchvision makes it; (b') is the same with the batch norms folded into the convolutions
            and the ReLUs fused with them, as the worker runs it; (b'') adds the front (transform,
            backbone, RPN head and anchors) replayed as a CUDA graph, as the worker runs it with
            MLFARM_MRCNN_CUDA_GRAPHS=true.
(c) farm    EXR plate on disk -> Farm.submit (what `mlfarm submit` calls) -> one GPU worker process
            -> EXR planes (rgba, matte, instance.id, class.id, score) + sidecar JSON on disk.
(c2)        the same with one worker per GPU on every visible GPU (when there are several).

(c) runs once per plate grain (``--grain``, default 0.01 and 0: film grain makes EXR zip encoding
several times dearer) and storage (``--storage``: disk, or shm for /dev/shm, where the fsync before
each output's atomic rename costs nothing); it prints how many cores the run kept busy and the
worker's per-chunk stage times. The first (grainy plate, disk) is the headline figure.

Precision variants of (b) are measured first (strict fp32, torch defaults, TF32, fp16 autocast,
channels_last): the evidence behind MLFARM_MRCNN_PRECISION's default, which (c) uses.

Run: python benchmarks/bench_mrcnn.py [--frames 400] [--chunk 4] [--grain 0.01,0] [--storage disk]
         [--variants 'MLFARM_EXR_THREADS=0;MLFARM_EXR_THREADS=-1'] [--profile prof.txt]
Needs a CUDA GPU (``--device cpu --width 160 --height 96 --frames 8`` checks the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import OpenImageIO as oiio
from bench_farm import start, stop

ARCH = "maskrcnn_resnet50_fpn"
DETECTIONS = 20


# --- inputs ------------------------------------------------------------------------------------
def make_weights(folder: Path) -> Path:
    import torch
    import torchvision

    from mlfarm.models.builtin.mrcnn.weights import ARCHITECTURES

    torch.manual_seed(8)
    net = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ARCHITECTURES[ARCH][0]
    torch.save(state, path)
    return path


def synthetic_frame(f: int, width: int, height: int, grain: float = 0.01) -> np.ndarray:
    """A scene-linear RGBA frame: gradient, shapes moving on a 100-frame cycle, film-like grain."""
    rng = np.random.default_rng(f)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 4), np.float32)
    img[..., 0] = 0.18 + 0.3 * x / width
    img[..., 1] = 0.12 + 0.2 * y / height
    img[..., 2] = 0.25
    for k in range(8):
        cx = (0.1 + 0.1 * k) * width + 4 * (f % 100)
        cy = (0.3 + 0.05 * (k % 4)) * height
        r = (0.04 + 0.01 * k) * height
        inside = (x - cx) ** 2 + ((y - cy) * 1.6) ** 2 < r * r
        img[inside, :3] = np.array([0.8, 0.3, 0.1], np.float32) * (1 + k % 3)
    if grain:
        img[..., :3] += rng.normal(0, grain, (height, width, 3)).astype(np.float32)
    img[..., 3] = 1.0
    return img


def write_plate(folder: Path, frames: list[int], width: int, height: int, threads: int, grain: float) -> str:
    folder.mkdir(parents=True, exist_ok=True)

    def one(f: int) -> None:
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.channelnames = ("R", "G", "B", "A")
        spec.attribute("compression", "zip")
        out = oiio.ImageOutput.create("openexr")
        out.open(str(folder / f"plate.{f:04d}.exr"), spec)
        out.write_image(synthetic_frame(f, width, height, grain))
        out.close()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, frames))
    return str(folder / "plate.####.exr")


# --- (a) and (b) in this process ----------------------------------------------------------------
def set_precision(torch, mode: str) -> None:
    """strict: no TF32 anywhere; default: torch's defaults (TF32 convolutions, fp32 matmuls); tf32: both."""
    torch.backends.cudnn.allow_tf32 = mode in ("default", "tf32")
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.benchmark = True


def sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def network_ms(torch, net, images: list, batch: int, device: str, channels_last: bool = False,
               autocast=None, warm: int = 3, graphs: bool = False) -> float:
    """With ``graphs``, the front (transform, backbone, RPN head and anchors) is replayed as a CUDA
    graph, as the worker does with MLFARM_MRCNN_CUDA_GRAPHS=true."""
    from mlfarm.models.builtin.mrcnn import network
    from mlfarm.models.cuda_graphs import GraphedFunction

    front = GraphedFunction(lambda x: network.front(net, x, channels_last, autocast), enabled=graphs)

    def run(g: list) -> None:
        stacked = torch.stack(g)
        network.heads(net, front(stacked), [tuple(stacked.shape[-2:])] * len(g), autocast)

    groups = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    with torch.inference_mode():
        for g in groups[:warm]:
            run(g)
        sync(torch, device)
        t = time.perf_counter()
        for g in groups:
            run(g)
        sync(torch, device)
    return (time.perf_counter() - t) / (len(groups) * batch) * 1000


def network_lanes_ms(torch, net, images: list, batch: int, lanes: int, warm: int = 3) -> float:
    """The network with ``lanes`` threads, each on its own CUDA stream, taking batches in turn: how
    far dispatching one batch while another waits on the GPU can take it (the worker's lanes)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlfarm.models.builtin.mrcnn import network

    groups = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    streams = [torch.cuda.Stream() for _ in range(lanes)]

    def lane(k: int, todo: list) -> None:
        with torch.inference_mode(), torch.cuda.stream(streams[k]):
            streams[k].wait_stream(torch.cuda.default_stream())
            for g in todo:
                network.run(net, g)
            streams[k].synchronize()

    with ThreadPoolExecutor(lanes) as pool:
        list(pool.map(lane, range(lanes), [groups[:warm]] * lanes))
        t = time.perf_counter()
        list(pool.map(lane, range(lanes), [groups[k::lanes] for k in range(lanes)]))
    return (time.perf_counter() - t) / (len(groups) * batch) * 1000


def naive_ms(torch, tv_net, images_host: list, device: str) -> tuple[float, float]:
    """Per frame: upload, model([img]), every output to the host. Returns (ms/frame, detections/frame)."""
    counts = []
    with torch.inference_mode():
        for img in images_host[:2]:
            tv_net([torch.from_numpy(img).to(device).permute(2, 0, 1)])
        sync(torch, device)
        t = time.perf_counter()
        for img in images_host:
            out = tv_net([torch.from_numpy(img).to(device).permute(2, 0, 1)])[0]
            host = {k: v.cpu() for k, v in out.items()}
            counts.append(len(host["scores"]))
    return (time.perf_counter() - t) / len(images_host) * 1000, float(np.mean(counts))


def calibrate_threshold(torch, net, images: list) -> float:
    """A score threshold that leaves well over DETECTIONS boxes after NMS on every sample frame, so
    every side (and every frame of the cycle) hits the cap."""
    from mlfarm.models.builtin.mrcnn import network

    net = network.configured(net, 800, 1333, 0.0, max(100, 2 * DETECTIONS + 1))
    found = []
    with torch.inference_mode():
        for image in images:
            scores = network.run(net, [image])[0]["scores"].sort(descending=True).values
            found.append(float(scores[min(len(scores) - 1, 2 * DETECTIONS)]))
    return max(0.0, min(found) - 1e-6)


def busy_cores() -> tuple[float, float]:
    """(busy, total) CPU jiffies from /proc/stat, to tell how many cores a run kept busy."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


class GpuBusy:
    """Samples nvidia-smi's utilization.gpu (the share of time a kernel was running) every 100 ms
    while a run lasts: whether the farm leaves the GPU idle, and how much (None without nvidia-smi)."""

    def __enter__(self) -> GpuBusy:
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.percent: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        self.percent = float(np.mean(values)) if values else None


# --- (c) through the farm -----------------------------------------------------------------------
def start_worker(env: dict[str, str], log: Path, name: str, gpu: int | None, cpus: list[int] | None = None,
                 timeout: float = 120):
    from mlfarm.cpus import format_cpus

    cmd = [sys.executable, "-m", "mlfarm", "worker", "--queues", "gpu", "--name", name]
    if gpu is not None:
        cmd += ["--gpu", str(gpu)]
    if cpus:
        cmd += ["--cpus", format_cpus(cpus)]
    return start(cmd, env, log, f"{name} ready.", timeout)


def start_profile(path: str, pid: int, seconds: int = 8, gil: bool = False) -> subprocess.Popen | None:
    """py-spy (where installed) samples every thread of a worker, native frames included, as
    collapsed stacks: where the worker's CPU time goes while it renders."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        print("py-spy not found: no profile", flush=True)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50",
                             "--format", "raw", "--threads", "--idle", "--native",
                             "--output", path, *(["--gil"] if gil else [])], stdout=subprocess.DEVNULL)


def run_job(farm, plate: str, out: str, frames: list[int], chunk: int, options: dict) -> tuple[float, object]:
    t = time.perf_counter()
    spec = farm.submit("mrcnn", plate, out, frames, options, chunk=chunk, force=True)  # timed: never from the cache
    while True:
        st = farm.status(spec.id)
        if st.finished:
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t
    if st.state != "done":
        raise RuntimeError(f"{st.summary()}: " + "; ".join(fs.reason for fs in st.failed_frames[:3]))
    return elapsed, st


def check_outputs(out: str, frames: list[int]) -> float:
    """Mean detections per frame from the sidecars; also checks, on every tenth frame, that the
    planes decode and agree with the detections (ids, matte, each instance's visible pixels)."""
    from mlfarm.exr.io import read_image, sidecar_path
    from mlfarm.frames import frame_path

    counts = []
    for f in frames[:: max(1, len(frames) // 10)]:
        path = frame_path(out, f)
        image = read_image(path)
        planes = {name: image.pixels[:, :, i] for i, name in enumerate(image.channels)}
        assert {"R", "G", "B", "A", "matte.A", "instance.id", "class.id", "score.value"} <= set(planes), planes.keys()
        dets = json.loads(Path(sidecar_path(path)).read_text())["objects"][0]["detections"]
        ids = planes["instance.id"].astype(np.int64)
        assert np.array_equal(planes["matte.A"], (ids > 0).astype(np.float32)), f"frame {f}: matte != ids > 0"
        assert [d["pixels"] for d in dets] == [int((ids == d["id"]).sum()) for d in dets], f"frame {f}: pixels"
        counts.append(len(dets))
    return float(np.mean(counts))


def main() -> None:
    global DETECTIONS
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=400, help="frames in the farm runs")
    ap.add_argument("--chunk", type=int, default=None,
                    help="frames per task (default: MLFARM_DEFAULT_CHUNK, what `mlfarm submit` sends)")
    ap.add_argument("--grain", default="0.01,0", help="plate grain (std dev, scene-linear) per farm run")
    ap.add_argument("--variants", default="",
                    help="worker settings to compare, one farm run each: variants separated by ';', each a list of "
                    "KEY=VALUE environment variables, e.g. 'MLFARM_EXR_THREADS=0;MLFARM_EXR_THREADS=-1' "
                    "(default: one run with the settings' defaults); two keys are the bench's own: "
                    "WORKERS_PER_GPU=K (K worker processes share each GPU; default auto, as `mlfarm worker "
                    "--gpus` decides) and CHUNK=N (frames per task)")
    ap.add_argument("--profile", default=None,
                    help="with py-spy installed: sample worker 0 in an extra run after the first into this file")
    ap.add_argument("--profile-gil", action="store_true",
                    help="sample only the thread holding the GIL (py-spy --gil): who the GPU thread waits for")
    ap.add_argument("--storage", default="disk",
                    help="where plate and outputs live: disk (a temporary folder), shm (/dev/shm), or both")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--naive-frames", type=int, default=20)
    ap.add_argument("--detections", type=int, default=DETECTIONS,
                    help="detections a frame on every side (the issue's: 20; its 1.7 fps naive figure was for 100)")
    ap.add_argument("--net-frames", type=int, default=32)
    ap.add_argument("--io-threads", type=int, default=None,
                    help="per worker (default: the worker's own, one a core)")
    ap.add_argument("--precision", default=None, help="worker MLFARM_MRCNN_PRECISION (default: the setting's)")
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs for (c2) (default: all visible)")
    ap.add_argument("--no-share-cores", action="store_true",
                    help="do not pin each worker to its GPU's share of the cores (as `mlfarm worker --gpus` does); "
                    "by default the 1-GPU baseline also runs on one GPU's share")
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--logs", default=None, help="copy every worker's log into this folder")
    args = ap.parse_args()
    DETECTIONS = args.detections

    import torch
    import torchvision

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.client import Farm
    from mlfarm.models.builtin.mrcnn import network
    from mlfarm.models.colour import linear_to_srgb
    from mlfarm.settings import Settings
    from mlfarm.worker.supervisor import gpu_memory_gib, workers_per_gpu

    device = args.device
    cuda = device.startswith("cuda")
    gpu_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    n_gpus = (args.gpus or torch.cuda.device_count()) if cuda else 1
    figures: dict[str, object] = {"device": gpu_name, "gpus": torch.cuda.device_count() if cuda else 0,
                                  "cores": os.cpu_count(), "size": f"{args.width}x{args.height}",
                                  "torch": torch.__version__, "torchvision": torchvision.__version__}
    print(f"device: {gpu_name} x{figures['gpus']}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"frames {args.width}x{args.height}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-mrcnn-bench-"))
    procs: list[subprocess.Popen] = []
    server = None
    try:
        t0 = time.perf_counter()
        weights = make_weights(tmp / "weights")
        frames = list(range(1, args.frames + 1))
        print(f"setup: weights in {time.perf_counter() - t0:.1f}s", flush=True)

        # Frames for (a)/(b): the same pictures, display-referred as the network wants them.
        n_mem = max(args.naive_frames, args.net_frames)
        host = [np.ascontiguousarray(linear_to_srgb(synthetic_frame(f, args.width, args.height)[..., :3], np)
                                     .clip(0, 1)) for f in frames[:n_mem]]
        gpu_imgs = [torch.from_numpy(h).to(device).permute(2, 0, 1) for h in host[:args.net_frames]]

        net = network.build(ARCH, weights, fold=False).to(device)  # torchvision's network as it comes
        set_precision(torch, "default")
        cycle = [synthetic_frame(f, args.width, args.height)[..., :3] for f in (1, 25, 50, 75, 99)]
        thresh = calibrate_threshold(torch, net, [torch.from_numpy(linear_to_srgb(c, np).clip(0, 1)).to(device)
                                                  .permute(2, 0, 1) for c in cycle])
        del cycle
        net = network.configured(net, 800, 1333, thresh, DETECTIONS)
        with torch.inference_mode():
            per_frame = [len(d["scores"]) for d in network.run(net, gpu_imgs[:4])]
        figures["thresh"] = thresh
        print(f"threshold {thresh:.6f}: {per_frame} detections on the first frames (cap {DETECTIONS})", flush=True)

        # Precision variants of the network (b), to choose the worker's settings by measurement.
        variants = {}
        batch = 4
        if cuda:
            for label, mode, cl, ac in (("strict fp32", "strict", False, None),
                                        ("torch default", "default", False, None),
                                        ("tf32", "tf32", False, None),
                                        ("tf32 + channels_last", "tf32", True, None),
                                        ("fp16 autocast", "tf32", False, torch.float16),
                                        ("fp16 autocast + channels_last", "tf32", True, torch.float16)):
                set_precision(torch, mode)
                if cl:
                    net.backbone.to(memory_format=torch.channels_last)
                ms1 = network_ms(torch, net, gpu_imgs, 1, device, cl, ac)
                msb = network_ms(torch, net, gpu_imgs, batch, device, cl, ac)
                net.backbone.to(memory_format=torch.contiguous_format)
                variants[label] = {"batch1_ms": ms1, f"batch{batch}_ms": msb, "mode": mode, "channels_last": cl,
                                   "fp16": ac is not None}
                print(f"  network {label:30s}: {ms1:6.2f} ms/frame at batch 1, {msb:6.2f} at batch {batch}",
                      flush=True)
        figures["network_variants"] = variants

        # (b) the network alone, torch defaults, batch 1 (the 21-29 ms) and batch 4.
        set_precision(torch, "default")
        b1 = network_ms(torch, net, gpu_imgs, 1, device)
        bb = network_ms(torch, net, gpu_imgs, batch, device)
        figures["b_network_batch1_fps"] = 1000 / b1
        figures[f"b_network_batch{batch}_fps"] = 1000 / bb
        b8 = network_ms(torch, net, gpu_imgs, 8, device) if len(gpu_imgs) >= 16 else None
        if b8:
            figures["b_network_batch8_fps"] = 1000 / b8
        # (b') the same weights, batch norms folded into the convolutions and ReLUs fused with them.
        folded = network.build(ARCH, weights).to(device)
        folded = network.configured(folded, 800, 1333, thresh, DETECTIONS)
        f1 = network_ms(torch, folded, gpu_imgs, 1, device)
        fb = network_ms(torch, folded, gpu_imgs, batch, device)
        figures["b_folded_batch1_fps"] = 1000 / f1
        figures[f"b_folded_batch{batch}_fps"] = 1000 / fb
        # (b'') folded, and the front replayed as a CUDA graph (MLFARM_MRCNN_CUDA_GRAPHS=true)
        g1 = network_ms(torch, folded, gpu_imgs, 1, device, graphs=True)
        gb = network_ms(torch, folded, gpu_imgs, batch, device, graphs=True)
        figures["b_graphed_batch1_fps"] = 1000 / g1
        figures[f"b_graphed_batch{batch}_fps"] = 1000 / gb
        del folded
        if cuda:  # what the worker's lanes (MLFARM_MRCNN_LANES) can reach, for comparison
            for lanes in (2, 3):
                ms = network_lanes_ms(torch, net, gpu_imgs, batch, lanes)
                figures[f"b_network_batch{batch}_{lanes}lanes_fps"] = 1000 / ms
                print(f"  network batch {batch}, {lanes} lanes: {1000 / ms:7.2f} frames/s", flush=True)

        # (a) the naive script loop, same weights and threshold.
        tv_net = network.build(ARCH, weights, fold=False).to(device)
        tv_net.roi_heads.score_thresh = thresh
        tv_net.roi_heads.detections_per_img = DETECTIONS
        a_ms, a_dets = naive_ms(torch, tv_net, host[:args.naive_frames], device)
        figures["a_naive_fps"] = 1000 / a_ms
        figures["a_detections_per_frame"] = a_dets
        print(f"(a) naive loop      : {1000 / a_ms:7.2f} frames/s ({a_ms:.1f} ms/frame, {a_dets:.1f} detections/frame)",
              flush=True)
        print(f"(b) network alone   : {1000 / b1:7.2f} frames/s at batch 1 ({b1:.1f} ms), "
              f"{1000 / bb:.2f} at batch {batch} ({bb:.1f} ms/frame)"
              + (f", {1000 / b8:.2f} at batch 8" if b8 else ""), flush=True)
        print(f"(b') norms folded   : {1000 / f1:7.2f} frames/s at batch 1, {1000 / fb:.2f} at batch {batch} "
              "(and ReLUs fused: the network as the worker runs it)", flush=True)
        print(f"(b'') + CUDA graph  : {1000 / g1:7.2f} frames/s at batch 1, {1000 / gb:.2f} at batch {batch} "
              "(as the worker runs it with MLFARM_MRCNN_CUDA_GRAPHS=true)", flush=True)

        from mlfarm.models.builtin.mrcnn.settings import MrcnnSettings

        defaults, own = Settings(), MrcnnSettings()
        args.chunk = args.chunk or defaults.default_chunk
        precision = args.precision or own.mrcnn_precision
        channels_last = own.mrcnn_channels_last if args.channels_last == "auto" else args.channels_last == "on"
        figures["worker_precision"] = precision
        figures["worker_channels_last"] = channels_last
        del tv_net  # net and gpu_imgs stay: (b) is measured again after the farm runs
        if cuda:
            torch.cuda.empty_cache()

        # (c) the farm: embedded Redis, worker processes, EXR in and out.
        server = EmbeddedRedis.start(tmp / "redis")
        options = {"architecture": ARCH, "thresh": thresh, "max_detections": DETECTIONS}
        from mlfarm.cpus import format_cpus, split_cpus

        shares = None if args.no_share_cores or n_gpus < 2 else split_cpus(n_gpus)
        # For MLFARM_WORKERS_PER_GPU=auto, asked once: one nvidia-smi (or torch) subprocess.
        gpu_memory = gpu_memory_gib([str(i) for i in range(n_gpus)]) if cuda else [None]
        print(f"(c) worker settings: precision {precision}, channels_last {channels_last}, "
              f"{args.io_threads or 'the default (one a core)'} I/O threads, chunk {args.chunk}"
              + (f", cores per worker {' / '.join(format_cpus(c) for c in shares)}" if shares else ""), flush=True)
        figures["cores_per_worker"] = [format_cpus(c) for c in shares] if shares else None
        one_gpu: dict[str, list[float]] = {}  # every 1-GPU figure of each variant, in run order
        scaling: dict[str, list[float]] = {}  # each run's all-GPUs / 1-GPU figure, per variant
        worker_variants = [dict(kv.split("=", 1) for kv in v.split()) for v in args.variants.split(";")]
        runs = [(w.strip(), float(g), v) for w in args.storage.split(",") if w.strip()
                for g in args.grain.split(",") for v in worker_variants]
        plates: dict[tuple[str, float], tuple[Path, str]] = {}
        profile = args.profile
        for number, (storage, grain, variant) in enumerate(runs):
            where = " ".join([f"{storage} grain {grain:g}", *(f"{k}={v}" for k, v in variant.items())])
            variant = dict(variant)
            # Bench keys, not worker settings. Worker processes a GPU as `mlfarm worker --gpus` starts them.
            per_gpu_setting = variant.pop("WORKERS_PER_GPU", "auto")
            per_gpu, why = workers_per_gpu(per_gpu_setting, gpu_memory, len(os.sched_getaffinity(0)))
            print(f"[{where}] {per_gpu} worker process(es) a GPU ({why})", flush=True)
            chunk = int(variant.pop("CHUNK", args.chunk))
            # As `mlfarm worker --gpus` places them: every worker process on its own share of the cores.
            run_shares = shares
            if per_gpu > 1 and not args.no_share_cores:
                run_shares = split_cpus(n_gpus * per_gpu)
            tag = f"run{number}"
            if (storage, grain) not in plates:
                for old, _ in plates.values():
                    shutil.rmtree(old, ignore_errors=True)
                plates.clear()
                root = Path(tempfile.mkdtemp(prefix="mlfarm-bench-", dir="/dev/shm" if storage == "shm" else tmp))
                t0 = time.perf_counter()
                plate = write_plate(root / "plate", frames, args.width, args.height, os.cpu_count() or 4, grain)
                mb = sum(p.stat().st_size for p in (root / "plate").iterdir()) / len(frames) / 1e6
                print(f"[{storage} grain {grain:g}] {len(frames)}-frame EXR plate written in "
                      f"{time.perf_counter() - t0:.1f}s ({mb:.1f} MB a frame)", flush=True)
                plates[(storage, grain)] = (root, plate)
            root, plate = plates[(storage, grain)]
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")},
                   "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(root),
                   "MLFARM_DATA_DIR": str(tmp / "data"), "MLFARM_WEIGHTS_DIR": str(weights.parent),
                   "MLFARM_DEVICE": "cuda" if cuda else "cpu",
                   **({"MLFARM_IO_THREADS": str(args.io_threads)} if args.io_threads else {}),
                   "MLFARM_MRCNN_PRECISION": precision, "MLFARM_FRAME_TIME_LIMIT": "30",
                   "MLFARM_MRCNN_CHANNELS_LAST": str(channels_last).lower(), **variant,
                   "MLFARM_CONFIG": str(tmp / "none.toml")}
            settings = Settings(broker_url=server.url, storage_root=root, data_dir=tmp / "data",
                                weights_dir=weights.parent, frame_time_limit=30)
            farm = Farm(settings, server.url)
            results: dict[int, float] = {}
            for n in sorted({1, n_gpus}):
                while len(procs) < n * per_gpu:
                    i = len(procs)
                    gpu = i // per_gpu  # run_shares has one share per worker (per GPU when per_gpu is 1)
                    procs.append(start_worker(env, tmp / f"{tag}-w{i}.log", f"g{i}@bench",
                                              gpu if cuda else None, run_shares[i] if run_shares else None))
                # Warm-up: every worker loads the model, tunes cuDNN and captures its CUDA graphs (each
                # lane thread on its second batch) on a few frames first: once in a worker's life.
                run_job(farm, plate, str(root / f"warm{n}" / "m.####.exr"), frames[: 16 * len(procs)], 16, options)
                out = str(root / f"run{n}" / "m.####.exr")
                cpu0 = busy_cores()
                with GpuBusy() as gpu_busy:
                    secs, st = run_job(farm, plate, out, frames, chunk, options)
                cpu1 = busy_cores()
                cores = (cpu1[0] - cpu0[0]) / max(1.0, cpu1[1] - cpu0[1]) * (os.cpu_count() or 1)
                dets = check_outputs(out, frames)
                size = sum(p.stat().st_size for p in Path(out).parent.glob("*.exr")) / len(frames) / 1e6
                results[n] = len(frames) / secs
                if n == 1:
                    one_gpu.setdefault(where, []).append(results[n])
                gpu_note = f", GPU busy {gpu_busy.percent:.0f}%" if gpu_busy.percent is not None else ""
                print(f"[{where}] (c) mlfarm, {n} GPU worker(s): {results[n]:7.2f} frames/s ({len(frames)} frames "
                      f"in {secs:.1f}s, {dets:.1f} detections/frame, {size:.1f} MB a frame out, "
                      f"{cores:.1f} of {os.cpu_count()} cores busy{gpu_note})", flush=True)
                for i in range(len(procs)):
                    log = (tmp / f"{tag}-w{i}.log").read_text(errors="replace")
                    chunks = [ln.split("INFO mlfarm.worker: ")[-1] for ln in log.splitlines() if " done, " in ln]
                    print(f"    worker {i}: {chunks[-1] if chunks else '?'}", flush=True)
                figures[f"c_farm_{where}_{n}gpu_fps"] = results[n]
                figures[f"c_farm_{where}_{n}gpu_detections_per_frame"] = dets
                figures[f"c_farm_{where}_{n}gpu_busy_cores"] = cores
                figures[f"c_farm_{where}_{n}gpu_gpu_busy_percent"] = gpu_busy.percent
                if profile:  # once, after the first measured run: sampling slows what it samples
                    spy = start_profile(profile, procs[0].pid, gil=args.profile_gil)
                    run_job(farm, plate, str(root / "profiled" / "m.####.exr"), frames, chunk, options)
                    if spy is not None:
                        spy.wait()
                    shutil.rmtree(root / "profiled", ignore_errors=True)
                    profile = None
                shutil.rmtree(root / f"run{n}", ignore_errors=True)
            if n_gpus > 1:
                scaling.setdefault(where, []).append(results[n_gpus] / results[1])
            stop(procs, 60)
            procs.clear()
            if args.logs:
                Path(args.logs).mkdir(parents=True, exist_ok=True)
                for log in tmp.glob(f"{tag}-w*.log"):
                    shutil.copy(log, Path(args.logs) / log.name)
        for old, _ in plates.values():
            shutil.rmtree(old, ignore_errors=True)
        # (b) once more: the batch-1 figure is bound by how fast the host's CPU launches kernels, and
        # drifts by up to 1.4x on a shared host; the ratio to (c) takes the mean of before and after.
        set_precision(torch, "default")
        b1_after = network_ms(torch, net, gpu_imgs, 1, device)
        figures["b_network_batch1_fps_after"] = 1000 / b1_after
        b1_mean = 2 / (1 / b1 + 1 / b1_after)  # ms/frame of the mean frames/s
        del net, gpu_imgs
        print(f"(b) after the farm runs: {1000 / b1_after:7.2f} frames/s at batch 1 (before: {1000 / b1:.2f}; "
              f"mean {1000 / b1_mean:.2f})", flush=True)
        where = next(iter(one_gpu))  # the first: grainy plate, the realistic case
        print(f"headline (c): {where}", flush=True)
        c = one_gpu[where][0]
        print("", flush=True)
        print(f"device {gpu_name}: (a) {1000 / a_ms:.2f} fps, (b) {1000 / b1_mean:.2f} fps batch 1 (mean of "
              f"{1000 / b1:.2f} and {1000 / b1_after:.2f}) / {1000 / bb:.2f} fps batch {batch}, (c) {c:.2f} fps",
              flush=True)
        print(f"(c)/(a) = {c * a_ms / 1000:.2f}x   (c)/(b batch 1) = {c * b1_mean / 1000:.2f}x   "
              f"(c)/(b batch {batch}) = {c * bb / 1000:.2f}x   (c)/(b' batch 1) = {c * f1 / 1000:.2f}x", flush=True)
        for variant_where, fps in one_gpu.items():  # every run of every variant against the same (b)
            print(f"  [{variant_where}] 1 GPU: {', '.join(f'{v:.2f}' for v in fps)} fps; (c)/(b batch 1) "
                  f"{', '.join(f'{v * b1_mean / 1000:.2f}' for v in fps)}x", flush=True)
        figures["c_over_a"] = c * a_ms / 1000
        figures["c_over_b1"] = c * b1_mean / 1000
        figures[f"c_over_b{batch}"] = c * bb / 1000
        figures["c_over_b_folded1"] = c * f1 / 1000
        if n_gpus > 1:
            figures["multi_gpu_ratio"] = scaling[where][0]
            for variant_where, ratios in scaling.items():  # each against the 1-GPU run just before it
                print(f"  [{variant_where}] {n_gpus} GPUs / 1 GPU = {', '.join(f'{r:.2f}' for r in ratios)}x",
                      flush=True)
    finally:
        stop(procs)
        if server is not None:
            server.stop()
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
