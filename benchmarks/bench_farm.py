"""Farm overhead and throughput, measured against baselines in the same run.

1. Raw Celery: no-op tasks through a bare Celery worker on the same Redis (tasks/s, ms/task).
2. The same tiny frames through mlfarm with the pass-through model (chunk 1 and chunk 4) vs the
   same read -> model -> write done in-process: the farm's per-frame overhead, as a ratio to the
   raw Celery round trip.
3. Blur on a 1080p EXR sequence with 1 and 2 workers (frames/s).

Run: .venv/bin/python benchmarks/bench_farm.py [--tiny N] [--hd N]
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


def farm_seconds(farm, model: str, plate: str, out: str, frames: list[int], chunk: int, options: dict) -> float:
    """Submit and wait, polling as cheaply as the raw Celery baseline polls its last result.

    A full status read parses every frame record; done every few ms it would load the 2 cores the
    worker runs on. So wait on the last frame's record (one HGET: with one worker, chunks run in
    order), then on the whole job, then check every frame once.
    """
    from mlfarm.broker.jobs import frames_key

    t = time.perf_counter()
    spec = farm.submit(model, plate, out, frames, options, chunk=chunk)
    last = str(frames[-1])
    while json.loads(farm.redis.hget(frames_key(spec.id), last) or "{}").get("s") not in ("done", "failed"):
        time.sleep(0.005)  # as often as the raw baseline polls its last result
    while not (st := farm.status(spec.id)).finished:
        time.sleep(0.005)
    elapsed = time.perf_counter() - t
    assert st.state == "done", st.summary()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", type=int, default=400, help="tiny frames for the overhead test")
    ap.add_argument("--hd", type=int, default=24, help="1080p frames for the blur test")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions of the overhead test")
    args = ap.parse_args()

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.client import Farm
    from mlfarm.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-bench-"))
    server = EmbeddedRedis.start(tmp / "redis")
    root = tmp / "storage"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")},
           "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(root), "MLFARM_DEVICE": "cpu",
           "MLFARM_DATA_DIR": str(tmp / "data")}
    settings = Settings(broker_url=server.url, storage_root=root, data_dir=tmp / "data", device="cpu")
    farm = Farm(settings, server.url)
    procs: list[subprocess.Popen] = []
    try:
        print(f"machine: {os.cpu_count()} cores; Redis {server.url.split('@')[-1]}")
        raw_worker = start_raw_worker(server.url, tmp)
        frames = list(range(1, args.tiny + 1))
        tiny = write_plate(root / "tiny", args.tiny, 16, 16)
        procs.append(start([sys.executable, "-m", "mlfarm", "worker", "--name", "b1@bench"], env,
                           tmp / "w1.log", "b1@bench ready."))
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

        hd = write_plate(root / "hd", args.hd, 1920, 1080)
        hd_frames = list(range(1, args.hd + 1))
        local_hd = in_process_seconds_per_frame(hd, hd_frames[:4], root / "hd_local", root, "blur",
                                                {"kernel_size": 5})
        print(f"in-process blur 1080p : {1 / local_hd:8.2f} frames/s (1 process, read+blur+write)")
        for n_workers in (1, 2):
            while len(procs) < n_workers:
                i = len(procs) + 1
                procs.append(start([sys.executable, "-m", "mlfarm", "worker", "--name", f"b{i}@bench"], env,
                                   tmp / f"w{i}.log", f"b{i}@bench ready."))
            farm_seconds(farm, "blur", hd, str(root / "hd_warm" / "o.####.exr"), hd_frames[:2 * n_workers], 1,
                         {"kernel_size": 5})
            secs = farm_seconds(farm, "blur", hd, str(root / f"hd_w{n_workers}" / "o.####.exr"), hd_frames, 2,
                                {"kernel_size": 5})
            print(f"farm blur 1080p {n_workers} worker(s): {len(hd_frames) / secs:8.2f} frames/s "
                  f"({len(hd_frames)} frames in {secs:.1f}s; {len(hd_frames) / secs * local_hd:4.2f}x in-process)")
    finally:
        stop(procs)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
