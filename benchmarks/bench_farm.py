"""Farm overhead and throughput, measured against baselines in the same run.

1. Raw Celery: no-op tasks through a bare Celery worker on the same Redis (tasks/s, ms/task).
2. The same tiny frames through mlfarm with the pass-through model (chunk 1 and chunk 4) vs the
   same read -> model -> write done in-process: the farm's per-frame overhead, as a ratio to the
   raw Celery round trip.
3. Blur (kernel 5) on a 1080p RGBA half/zip EXR plate, in interleaved repetitions on the same plate:
   the plain in-process loop (read_image, infer_batch, write_exr, one frame at a time) against one
   worker (its threads sized by worker/sizing.py, or by each ``--variants`` entry's settings), then
   one worker on half the cores against two workers on a half each (ratio to linear).

Run: .venv/bin/python benchmarks/bench_farm.py [--tiny N] [--hd N] [--hd-repeat N] [--skip-tiny]
     [--variants 'MLFARM_WORKER_THREADS=1;MLFARM_WORKER_THREADS=2,MLFARM_TORCH_THREADS=1']
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

HERE = Path(__file__).resolve().parent


def write_plate(folder: Path, n: int, width: int, height: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.random((height, width, 4), dtype=np.float32)
    for f in range(1, n + 1):
        spec = oiio.ImageSpec(width, height, 4, oiio.HALF)
        spec.attribute("compression", "zip")
        out = oiio.ImageOutput.create(str(folder / f"p.{f:04d}.exr"))
        out.open(str(folder / f"p.{f:04d}.exr"), spec)
        out.write_image(np.roll(base, f, axis=1))
        out.close()
    return str(folder / "p.####.exr")


def start(cmd: list[str], env: dict[str, str], log: Path, ready: str, timeout: float = 60) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd} did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def stop(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM to all (a warm shutdown for workers), then SIGKILL what has not exited in ``timeout``."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_raw_worker(url: str, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "RAW_BROKER_URL": url, "PYTHONPATH": str(HERE)}
    return start([sys.executable, "-m", "celery", "-A", "raw_celery_app", "worker", "-P", "solo", "-c", "1",
                  "--without-mingle", "--without-gossip", "-l", "INFO"], env, tmp / "raw.log", "ready.")


def raw_celery_seconds(url: str, n: int) -> tuple[float, float]:
    """(seconds per task with a full queue, seconds per sequential round trip) for no-op tasks."""
    sys.path.insert(0, str(HERE))
    os.environ["RAW_BROKER_URL"] = url
    from raw_celery_app import noop

    noop.delay(0).get(timeout=30)  # warm up
    t = time.perf_counter()
    results = [noop.delay(i) for i in range(n)]
    results[-1].get(timeout=300, interval=0.005)  # one worker, FIFO: the last one ends the run
    throughput = (time.perf_counter() - t) / n
    assert all(r.ready() for r in results)
    trips = max(20, n // 10)
    t = time.perf_counter()
    for i in range(trips):
        noop.delay(i).get(timeout=30, interval=0.0005)
    return throughput, (time.perf_counter() - t) / trips


def in_process_seconds_per_frame(plate: str, frames: list[int], out_dir: Path, root: Path, model_name: str,
                                 options: dict) -> float:
    from mlfarm.exr.io import assemble_planes, read_image, write_exr
    from mlfarm.frames import frame_path
    from mlfarm.models.catalog import Catalog, discover

    model = Catalog(discover()).entry(model_name).create()
    model.load("cpu")
    model.set_options(options)
    out = str(out_dir / "o.####.exr")
    t = time.perf_counter()
    for f in frames:
        pixels = read_image(frame_path(plate, f)).rgba(4)
        images = model.infer_batch([[pixels]])[0]
        px, names, data = assemble_planes(model.outputs, images)
        write_exr(frame_path(out, f), root, px, names, data, {"mlfarm/frame": f})
    return (time.perf_counter() - t) / len(frames)


def parse_variants(spec: str) -> list[tuple[str, dict[str, str]]]:
    """``'A=1,B=2;C=3'``: one worker's extra environment per ``;``; ``auto`` (or empty) for none."""
    variants = []
    for part in (p.strip() for p in spec.split(";")):
        if not part or part == "auto":
            variants.append(("auto", {}))
            continue
        env = dict(kv.strip().split("=", 1) for kv in part.split(",") if kv.strip())
        variants.append((",".join(f"{k.removeprefix('MLFARM_').lower()}={v}" for k, v in env.items()), env))
    return variants


def start_worker(name: str, env: dict[str, str], tmp: Path, cpus: list[int] | None = None) -> subprocess.Popen:
    from mlfarm.cpus import format_cpus

    argv = [sys.executable, "-m", "mlfarm", "worker", "--name", f"{name}@bench"]
    if cpus:
        argv += ["--cpus", format_cpus(cpus)]
    return start(argv, env, tmp / f"{name}.log", f"{name}@bench ready.")


def plan_line(tmp: Path, name: str) -> str:
    """What the worker chose (its first log line: worker/sizing.py)."""
    for line in (tmp / f"{name}.log").read_text(errors="replace").splitlines():
        if " sized for " in line:
            return line.split(" sized for ", 1)[1].split(";", 1)[0]
    return "?"


def farm_seconds(farm, model: str, plate: str, out: str, frames: list[int], chunk: int, options: dict) -> float:
    """Submit and wait, polling as cheaply as the raw Celery baseline polls its last result.

    A full status read parses every frame record; done every few ms it would load the 2 cores the
    worker runs on. So wait on the last frame's record (one HGET: with one worker, chunks run in
    order), then on the whole job, then check every frame once.
    """
    from mlfarm.broker.jobs import frames_key

    t = time.perf_counter()
    spec = farm.submit(model, plate, out, frames, options, chunk=chunk, force=True)  # timed: never from the frame cache
    last = str(frames[-1])
    while json.loads(farm.redis.hget(frames_key(spec.id), last) or "{}").get("s") not in ("done", "failed"):
        time.sleep(0.005)  # as often as the raw baseline polls its last result
    while not (st := farm.status(spec.id)).finished:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t
    assert st.state == "done", st.summary()
    return elapsed


def blur_section(args: argparse.Namespace, farm, env: dict[str, str], tmp: Path, root: Path,
                 procs: list[subprocess.Popen]) -> None:
    """The 1080p blur: the in-process loop against one worker per variant, interleaved; then one
    worker on half the cores against two on a half each. Every worker is started afresh and warmed
    up (a job of one chunk) before it is timed."""
    from mlfarm.cpus import available_cpus, split_cpus

    options = {"kernel_size": 5}
    hd = write_plate(root / "hd", args.hd, 1920, 1080)
    frames = list(range(1, args.hd + 1))
    variants = parse_variants(args.variants)
    n = 0

    def one_worker_fps(extra: dict[str, str], cpus: list[list[int]] | None = None) -> tuple[float, str]:
        nonlocal n
        n += 1
        names = [f"w{n}_{i}" for i in range(len(cpus or [None]))]
        procs.extend(start_worker(name, {**env, **extra}, tmp, share) for name, share in zip(names, cpus or [None]))
        try:
            farm_seconds(farm, "blur", hd, str(root / f"hd_warm{n}" / "o.####.exr"), frames[:args.chunk * len(names)],
                         args.chunk, options)
            secs = farm_seconds(farm, "blur", hd, str(root / f"hd{n}" / "o.####.exr"), frames, args.chunk, options)
        finally:
            stop(procs)
            procs.clear()
        return len(frames) / secs, plan_line(tmp, names[0])

    print(f"blur 1080p RGBA half/zip, kernel 5, {args.hd} frames, chunk {args.chunk}; "
          f"{args.hd_repeat} interleaved repetitions (each line one run; ratios within the run)")
    loop: list[float] = []
    fps: dict[str, list[float]] = {label: [] for label, _ in variants}
    for rep in range(args.hd_repeat):
        loop.append(1 / in_process_seconds_per_frame(hd, frames, root / f"hd_local{rep}", root, "blur", options))
        print(f"  run {rep + 1}: in-process loop {loop[-1]:5.2f} frames/s")
        for label, extra in variants:
            value, chosen = one_worker_fps(extra)
            fps[label].append(value)
            print(f"  run {rep + 1}: farm, 1 worker [{label}] {value:5.2f} frames/s = "
                  f"{value / loop[-1]:4.2f}x the loop ({chosen})")
    print(f"in-process loop          : {statistics.median(loop):5.2f} frames/s (median; "
          f"{min(loop):.2f}-{max(loop):.2f})")
    for label, values in fps.items():
        ratios = [v / lp for v, lp in zip(values, loop)]
        print(f"farm, 1 worker [{label}]: {statistics.median(values):5.2f} frames/s (median; "
              f"{min(values):.2f}-{max(values):.2f}); {statistics.median(ratios):4.2f}x the loop "
              f"({min(ratios):.2f}-{max(ratios):.2f}x)")
    if args.skip_scaling:
        return
    cores = available_cpus()
    halves = split_cpus(2, cores)
    note = "" if len(cores) >= 4 else (f"; only {len(cores)} cores: each worker has one, and Redis and this "
                                       "client share them, so the ratio to linear is not meaningful here")
    print(f"1 worker on cores {halves[0]} vs 2 workers on {halves[0]} and {halves[1]}{note}")
    scaling = []
    for rep in range(args.hd_repeat):
        one, chosen = one_worker_fps({}, halves[:1])
        two, _ = one_worker_fps({}, halves)
        scaling.append(two / (2 * one))
        print(f"  run {rep + 1}: 1 worker {one:5.2f} frames/s, 2 workers {two:5.2f} frames/s = "
              f"{two / one:4.2f}x, {two / (2 * one):4.2f}x linear ({chosen})")
    print(f"2 workers vs 1           : {statistics.median(scaling):4.2f}x linear (median; "
          f"{min(scaling):.2f}-{max(scaling):.2f}){note}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", type=int, default=400, help="tiny frames for the overhead test")
    ap.add_argument("--hd", type=int, default=24, help="1080p frames for the blur test")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of the overhead test")
    ap.add_argument("--hd-repeat", type=int, default=3, help="interleaved repetitions of the blur test")
    ap.add_argument("--chunk", type=int, default=4, help="frames a chunk in the blur test (the farm's default)")
    ap.add_argument("--variants", default="auto", help="worker settings to compare in the blur test, "
                    "';'-separated, each 'KEY=VALUE,...' environment variables or 'auto' (worker/sizing.py)")
    ap.add_argument("--skip-tiny", action="store_true", help="only the blur test")
    ap.add_argument("--skip-scaling", action="store_true", help="no 1 vs 2 workers in the blur test")
    args = ap.parse_args()

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.client import Farm
    from mlfarm.cpus import available_cpus
    from mlfarm.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-bench-"))
    server = EmbeddedRedis.start(tmp / "redis")
    root = tmp / "storage"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")},
           "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(root), "MLFARM_DEVICE": "cpu",
           "MLFARM_DATA_DIR": str(tmp / "data"),
           "MLFARM_CACHE": "false"}  # every timed frame renders: none is found already written (the frame cache)
    settings = Settings(broker_url=server.url, storage_root=root, data_dir=tmp / "data", device="cpu")
    farm = Farm(settings, server.url)
    procs: list[subprocess.Popen] = []
    try:
        print(f"machine: {len(available_cpus())} cores; Redis {server.url.split('@')[-1]}")
        if args.skip_tiny:
            blur_section(args, farm, env, tmp, root, procs)
            return
        raw_worker = start_raw_worker(server.url, tmp)
        frames = list(range(1, args.tiny + 1))
        tiny = write_plate(root / "tiny", args.tiny, 16, 16)
        procs.append(start_worker("b1", env, tmp))
        farm_seconds(farm, "passthrough", tiny, str(root / "warm" / "o.####.exr"), frames[:8], 1, {})
        # Interleaved repetitions, medians: this machine is noisy.
        runs: dict[str, list[float]] = {"raw": [], "trip": [], "local": [], "c1": [], "c4": []}
        for rep in range(args.repeat):
            raw, trip = raw_celery_seconds(server.url, args.tiny)
            runs["raw"].append(raw)
            runs["trip"].append(trip)
            runs["local"].append(in_process_seconds_per_frame(tiny, frames, root / f"tiny_local{rep}", root,
                                                              "passthrough", {}))
            for chunk in (1, 4):
                out = str(root / f"tiny_c{chunk}_{rep}" / "o.####.exr")
                runs[f"c{chunk}"].append(farm_seconds(farm, "passthrough", tiny, out, frames, chunk, {}) / len(frames))
        stop([raw_worker])
        stop(procs)
        procs.clear()
        med = {k: statistics.median(v) for k, v in runs.items()}
        raw, trip, local = med["raw"], med["trip"], med["local"]
        print(f"medians of {args.repeat} interleaved runs, {args.tiny} frames 16x16 each")
        print(f"raw Celery no-op, full queue : {1 / raw:7.1f} tasks/s  {raw * 1000:6.2f} ms/task (baseline)")
        print(f"raw Celery no-op, round trip : {1 / trip:7.1f} tasks/s  {trip * 1000:6.2f} ms/task (baseline)")
        print(f"in-process passthrough       : {1 / local:7.1f} frames/s {local * 1000:6.2f} ms/frame "
              "(read+model+write)")
        for chunk in (1, 4):
            secs = med[f"c{chunk}"]
            overhead = secs - local
            print(f"farm passthrough chunk {chunk}     : {1 / secs:7.1f} frames/s {secs * 1000:6.2f} ms/frame; "
                  f"farm overhead {overhead * 1000:5.2f} ms/frame = {overhead / raw:4.2f}x full-queue Celery, "
                  f"{overhead / trip:4.2f}x round trip")

        blur_section(args, farm, env, tmp, root, procs)
    finally:
        stop(procs)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
