"""Soak: thousands of small frames through 2 workers while one of them is restarted at random.

Worker A runs throughout (its memory is sampled to see whether it grows); worker B is restarted
every few seconds, by SIGTERM (warm) or SIGKILL (its chunk is redelivered). Prints frames/s per
window, worker A's RSS over time, and checks at the end that every frame is done, once, with a
whole EXR at its output path.

Run: .venv/bin/python benchmarks/soak.py [--frames 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_farm import start, write_plate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--window", type=int, default=500, help="frames per throughput window")
    args = ap.parse_args()

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.client import Farm
    from mlfarm.exr.io import read_image
    from mlfarm.frames import frame_path
    from mlfarm.settings import Settings

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="mlfarm-soak-"))
    server = EmbeddedRedis.start(tmp / "redis")
    root = tmp / "storage"
    overrides = {"MLFARM_FRAME_TIME_LIMIT": "3", "MLFARM_CHUNK_SLACK": "2", "MLFARM_VISIBILITY_TIMEOUT": "15",
                 "MLFARM_RESTORE_INTERVAL": "1"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}, **overrides,
           "MLFARM_BROKER_URL": server.url, "MLFARM_STORAGE_ROOT": str(root), "MLFARM_DEVICE": "cpu",
           "MLFARM_DATA_DIR": str(tmp / "data")}
    settings = Settings(broker_url=server.url, storage_root=root, data_dir=tmp / "data", frame_time_limit=3,
                        chunk_slack=2, visibility_timeout=15)
    farm = Farm(settings, server.url)
    frames = list(range(1, args.frames + 1))
    plate = write_plate(root / "plate", args.frames, 16, 16)
    out = str(root / "out" / "o.####.exr")

    def worker(name: str) -> subprocess.Popen:
        return start([sys.executable, "-m", "mlfarm", "worker", "--name", f"{name}@soak"], env,
                     tmp / f"{name}.log", f"{name}@soak ready.")

    a = worker("a")
    b = worker("b")
    restarts = {"SIGTERM": 0, "SIGKILL": 0}
    windows: list[tuple[int, float]] = []
    rss: list[tuple[float, int]] = []
    try:
        t0 = time.perf_counter()
        spec = farm.submit("passthrough", plate, out, frames, chunk=1, force=True)  # every pass renders
        next_restart = time.perf_counter() + rng.uniform(1, 3)
        last_done, last_t = 0, t0
        while True:
            st = farm.status(spec.id)
            done = st.counts["done"]
            now = time.perf_counter()
            if done - last_done >= args.window or st.finished:
                windows.append((done, (done - last_done) / max(1e-9, now - last_t)))
                rss.append((now - t0, psutil.Process(a.pid).memory_info().rss))
                last_done, last_t = done, now
            if st.finished:
                break
            if now > next_restart:
                sig = signal.SIGKILL if rng.random() < 0.4 else signal.SIGTERM
                b.send_signal(sig)
                b.wait(60)
                restarts[sig.name] += 1
                b = worker("b")
                next_restart = time.perf_counter() + rng.uniform(1, 3)
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        bad = [f for f in frames if not os.path.exists(frame_path(out, f))]
        for f in frames[:: max(1, len(frames) // 200)]:
            read_image(frame_path(out, f))
        attempts = sorted({fs.attempts for fs in st.frames})
        print(f"soak: {args.frames} frames 16x16, 2 workers, worker B restarted {sum(restarts.values())} times "
              f"({restarts['SIGTERM']} SIGTERM, {restarts['SIGKILL']} SIGKILL)")
        print(f"result: {st.summary()} in {elapsed:.1f}s ({args.frames / elapsed:.1f} frames/s overall); "
              f"missing outputs: {len(bad)}; attempts per frame: {attempts}")
        print("throughput per window (frames done so far: frames/s): "
              + ", ".join(f"{d}: {fps:.0f}" for d, fps in windows))
        print("worker A RSS (s: MiB): " + ", ".join(f"{t:.0f}: {r / 2**20:.0f}" for t, r in rss))
        first, last = rss[0][1], rss[-1][1]
        print(f"worker A RSS growth first->last window: {(last - first) / 2**20:+.1f} MiB")
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
