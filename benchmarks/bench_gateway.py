"""MLClient gateway throughput and latency, against the model called in-process in the same run.

1920x1080 RGB float frames (the stock MLClient node always sends RGB) through the blur model:

1. baseline: ``model.inference`` in this process (no wire, no encoding);
2. ``mlfarm gateway`` -> one ``mlfarm worker`` (interactive queue) -> back, once for each
   ``MLFARM_GATEWAY_TRANSPORT``: pixels through Redis, and as files on the storage root (here a
   temporary folder on this machine's disk: on a farm, the shared storage);
3. ``mlfarm gateway --local`` (the model in the gateway's process).

For each: median latency of one client sending frames one after another, and frames/s with
several clients at once. The seed's own server did 2.0 frames/s (499 ms) for this on the 2-core
development machine; its figure is printed for reference, not re-measured. On a machine with a
GPU the worker and --local use it (MLFARM_DEVICE=auto); the baseline runs on the same device.

Run: .venv/bin/python benchmarks/bench_gateway.py [--frames 16] [--clients 2] [--size 1920x1080]
     [--transports redis,storage] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_farm import start, stop

from mlfarm.broker.embedded import EmbeddedRedis, free_port
from mlfarm.gateway import mlserver_pb2 as pb
from mlfarm.models.catalog import Catalog, discover
from mlfarm.worker.gpu import torch_device

SEED_FPS, SEED_MS = 2.0, 499.0


def request_bytes(width: int, height: int, channels: int, kernel: int) -> bytes:
    rng = np.random.default_rng(0)
    planar = rng.random((channels, height, width), dtype=np.float32) * 2.0
    request = pb.RequestWrapper(info=True)
    request.r2.model.name = "blur"
    request.r2.model.int_options.add(name="kernel_size", values=[kernel])
    request.r2.images.add(width=width, height=height, channels=channels, image=planar.astype("<f4").tobytes())
    body = request.SerializeToString()
    return f"{len(body):012d}".encode() + body


def exchange(port: int, payload: bytes, expect_bytes: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(payload)
        header = b""
        while len(header) < 12:
            chunk = sock.recv(12 - len(header))
            if not chunk:
                raise RuntimeError("gateway closed the connection without a reply")
            header += chunk
        body = bytearray(int(header) - 12)
        view, got = memoryview(body), 0
        while got < len(body):
            k = sock.recv_into(view[got:])
            if not k:
                raise RuntimeError("reply truncated")
            got += k
    elapsed = time.perf_counter() - started
    reply = pb.RespondWrapper()
    reply.ParseFromString(body)
    if reply.HasField("error"):
        raise RuntimeError(f"gateway error: {reply.error.msg}")
    if len(reply.r2.images[0].image) != expect_bytes:
        raise RuntimeError("reply image has the wrong size")
    return elapsed


def measure(port: int, payload: bytes, expect: int, frames: int, clients: int) -> tuple[float, float]:
    """(median latency in ms with one client, frames/s with ``clients`` clients)."""
    for _ in range(2):
        exchange(port, payload, expect)  # warm the model and the connections
    latencies = [exchange(port, payload, expect) for _ in range(frames)]
    per_client = max(1, frames // clients)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(per_client):
                exchange(port, payload, expect)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    return statistics.median(latencies) * 1000, per_client * clients / wall


def baseline(width: int, height: int, channels: int, kernel: int, frames: int) -> tuple[float, float, str]:
    model = Catalog(discover()).entry("blur").create()
    device = torch_device(model.device, os.environ.get("MLFARM_DEVICE", "auto"))
    model.load(device)
    model.set_options({"kernel_size": kernel})
    image = np.random.default_rng(0).random((height, width, channels), dtype=np.float32) * 2.0
    for _ in range(2):
        model.inference([image])
    times = []
    for _ in range(frames):
        t = time.perf_counter()
        model.inference([image])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, len(times) / sum(times), device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--kernel", type=int, default=5)
    ap.add_argument("--transports", default="redis,storage", help="farm paths to measure (MLFARM_GATEWAY_TRANSPORT)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every path this many times, interleaved; medians are printed (for a busy machine)")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    payload = request_bytes(width, height, args.channels, args.kernel)
    expect = width * height * args.channels * 4

    with tempfile.TemporaryDirectory(prefix="mlfarm-bench-gw-") as tmp:
        root = Path(tmp)
        redis_server = EmbeddedRedis.start(root / "redis")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
        env.update({"MLFARM_BROKER_URL": redis_server.url, "MLFARM_DATA_DIR": str(root / "data"),
                    "MLFARM_STORAGE_ROOT": str(root / "storage"), "MLFARM_CONFIG": str(root / "none.toml"),
                    "MLFARM_DEVICE": os.environ.get("MLFARM_DEVICE", "auto"), "PYTHONUNBUFFERED": "1"})
        procs: list[subprocess.Popen] = []

        def mlfarm(args: list[str], env: dict[str, str], log: Path, ready: str) -> subprocess.Popen:
            return start([sys.executable, "-m", "mlfarm", *args], env, log, ready, timeout=120)

        runs: dict[str, list[tuple[float, float, float]]] = {}
        try:
            for _ in range(args.repeat):
                base_ms, base_fps, device = baseline(width, height, args.channels, args.kernel, args.frames)
                runs.setdefault("in-process model call (baseline)", []).append((base_ms, base_fps, base_fps))
                for transport in (t.strip() for t in args.transports.split(",") if t.strip()):
                    farm_env = {**env, "MLFARM_GATEWAY_TRANSPORT": transport}
                    procs.append(mlfarm(["worker", "--queues", "interactive", "--name", "bench@gw"], farm_env,
                                        root / "worker.log", "bench@gw ready."))
                    port = free_port()
                    procs.append(mlfarm(["gateway", "--host", "127.0.0.1", "--port", str(port)], farm_env,
                                        root / "gw.log", "listening on"))
                    ms, fps = measure(port, payload, expect, args.frames, args.clients)
                    runs.setdefault(f"gateway -> 1 worker, via {transport}", []).append((ms, 1000 / ms, fps))
                    stop([procs.pop()])
                    stop([procs.pop()])
                    for log in ("worker.log", "gw.log"):  # the next process's "ready" line must be its own
                        (root / log).unlink()

                port = free_port()
                procs.append(mlfarm(["gateway", "--local", "--host", "127.0.0.1", "--port", str(port)], env,
                                    root / "gwlocal.log", "listening on"))
                ms, fps = measure(port, payload, expect, args.frames, args.clients)
                runs.setdefault("gateway --local", []).append((ms, 1000 / ms, fps))
                stop([procs.pop()])
                (root / "gwlocal.log").unlink()
        finally:
            stop(procs)
            redis_server.stop()
    rows = [(name, *(statistics.median(r[i] for r in results) for i in range(3))) for name, results in runs.items()]
    base_fps = rows[0][3]

    print(f"\nMLClient gateway, blur kernel_size={args.kernel}, {width}x{height}x{args.channels} float32 "
          f"({expect / 1e6:.1f} MB a frame each way), model on {device}, {os.cpu_count()} CPU cores")
    print(f"{'path':36} {'median ms':>10} {'1-client f/s':>13} {f'{args.clients}-client f/s':>13} "
          f"{'vs baseline':>12} {'vs seed':>8}")
    for name, ms, seq_fps, conc_fps in rows:
        print(f"{name:36} {ms:10.1f} {seq_fps:13.2f} {conc_fps:13.2f} {conc_fps / base_fps:11.2f}x "
              f"{conc_fps / SEED_FPS:7.1f}x")
    if args.repeat > 1:
        print(f"(medians of {args.repeat} interleaved runs; load average at the end: "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    print(f"(seed nuke-ML-server on the 2-core dev machine: {SEED_FPS} frames/s, {SEED_MS:.0f} ms; not re-measured)")


if __name__ == "__main__":
    main()
