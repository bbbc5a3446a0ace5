"""Check a GPU host end to end: `mlfarm worker --gpus all` runs one worker per GPU, each on its own card.

Starts a throwaway embedded Redis, runs the supervisor on every visible GPU with MLFARM_DEVICE=cuda,
and submits a job of a probe model that records, in each output EXR's header, which GPU it ran on
(CUDA_VISIBLE_DEVICES, how many GPUs torch saw, the card's UUID). The result is compared with
nvidia-smi: every GPU must have rendered frames from the worker named after it, and no worker may
have seen more than one GPU. Then a SIGTERM must stop every worker cleanly.

Run where mlfarm is installed, from the repository root:

    python compose/gpu_check.py [--frames 32]
    python compose/gpu_check.py --gpus 0,1 --device cpu     # the script itself, on a machine without GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import OpenImageIO as oiio

PROBE = '''
import os
import time

from mlfarm.models import BaseModel


class Model(BaseModel):
    """Copies the image through the GPU and says which GPU that was."""

    def __init__(self):
        super().__init__()
        self.name = "GPU probe"
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "gpu"

    def inference(self, image_list):
        import torch

        out = torch.from_numpy(image_list[0]).to(self.torch_device).mul(1.0).cpu().numpy()
        time.sleep(0.2)  # long enough that every worker gets frames
        info = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(self.torch_device),
                "count": torch.cuda.device_count(), "uuid": None}
        if str(self.torch_device).startswith("cuda"):
            info["uuid"] = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return [out, info]
'''


def nvidia_smi() -> dict[str, str]:
    """index -> UUID (without the GPU- prefix), as nvidia-smi numbers the cards."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                         text=True, check=True).stdout
    return {i.strip(): u.strip().removeprefix("GPU-") for i, u in (line.split(",") for line in out.splitlines())}


def write_plate(folder: Path, frames: list[int]) -> str:
    folder.mkdir(parents=True)
    for f in frames:
        pixels = np.full((48, 64, 4), f / 1000.0, dtype=np.float32)
        path = str(folder / f"plate.{f:04d}.exr")
        out = oiio.ImageOutput.create(path)
        out.open(path, oiio.ImageSpec(64, 48, 4, oiio.FLOAT))
        out.write_image(pixels)
        out.close()
    return str(folder / "plate.####.exr")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--gpus", default="all", help="what to pass to `mlfarm worker --gpus`")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="MLFARM_DEVICE for the workers")
    args = ap.parse_args()

    from mlfarm.broker.embedded import EmbeddedRedis
    from mlfarm.client import Farm
    from mlfarm.frames import frame_path
    from mlfarm.settings import Settings

    smi = nvidia_smi()
    print(f"nvidia-smi: {len(smi)} GPU(s) {smi}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="mlfarm-gpu-check-"))
    redis = EmbeddedRedis.start(work / "redis")
    (work / "models" / "gpuprobe").mkdir(parents=True)
    (work / "models" / "gpuprobe" / "__init__.py").write_text("")
    (work / "models" / "gpuprobe" / "model.py").write_text(PROBE)
    values = {"broker_url": redis.url, "storage_root": work / "storage", "data_dir": work / "data",
              "models_path": str(work / "models"), "device": args.device}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
    env.update({f"MLFARM_{k.upper()}": str(v) for k, v in values.items()})
    env.update({"MLFARM_CONFIG": str(work / "none.toml"), "PYTHONUNBUFFERED": "1"})
    log_path = work / "workers.log"
    log = open(log_path, "ab")  # noqa: SIM115
    t0 = time.monotonic()
    sup = subprocess.Popen([sys.executable, "-m", "mlfarm", "worker", "--gpus", args.gpus, "--queues", "gpu"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ok = False
    try:
        expected = len(smi) if args.gpus == "all" else len(args.gpus.split(","))
        while len(re.findall(r"\S+ ready\.", log_path.read_text(errors="replace"))) < expected:
            if sup.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"workers did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        started = re.findall(r"supervisor: started (\S+) on GPU (\S+) \(pid (\d+)\)", log_path.read_text())
        print(f"{len(started)} worker(s) ready in {time.monotonic() - t0:.1f} s: "
              + ", ".join(f"{n} (GPU {g}, pid {p})" for n, g, p in started), flush=True)

        frames = list(range(1, args.frames + 1))
        plate = write_plate(work / "storage" / "plate", frames)
        out = str(work / "storage" / "out" / "probe.####.exr")
        farm = Farm(Settings(**values))
        t1 = time.monotonic()
        spec = farm.submit("gpuprobe", plate, out, frames, chunk=1)
        status = farm.status(spec.id)
        while not status.finished:
            if time.monotonic() - t1 > 300:
                raise RuntimeError(f"job not finished: {status.summary()}\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
            status = farm.status(spec.id)
        elapsed = time.monotonic() - t1
        print(f"job: {status.summary()} in {elapsed:.1f} s", flush=True)

        seen: dict[str, list[dict]] = defaultdict(list)
        for fs in status.frames:
            inp = oiio.ImageInput.open(frame_path(out, fs.frame))
            info = json.loads(inp.spec().getattribute("mlfarm/objects"))[0]
            inp.close()
            seen[fs.worker.split(":")[0]].append(info)
        problems = [] if status.state == "done" else [f"job {status.state}"]
        uuids = {}
        for worker, infos in sorted(seen.items()):
            gpu = re.match(r"mlfarm-gpu(\w+)@", worker)
            cards = {i["uuid"] for i in infos}
            counts = {i["count"] for i in infos}
            print(f"  {worker}: {len(infos)} frames, CUDA_VISIBLE_DEVICES={infos[0]['visible']}, "
                  f"device {infos[0]['device']}, torch saw {counts} GPU(s), card {cards}", flush=True)
            if args.device == "cuda":
                if counts != {1}:
                    problems.append(f"{worker} saw {counts} GPUs, not 1")
                if len(cards) != 1:
                    problems.append(f"{worker} ran on {cards}")
                uuids[worker] = next(iter(cards))
                if gpu and smi.get(gpu[1]) != uuids[worker]:
                    problems.append(f"{worker} ran on {uuids[worker]}, nvidia-smi's GPU {gpu[1]} is {smi.get(gpu[1])}")
        if len(seen) != expected:
            problems.append(f"{len(seen)} workers rendered, expected {expected}")
        if args.device == "cuda" and args.gpus == "all" and set(uuids.values()) != set(smi.values()):
            problems.append(f"cards used {sorted(uuids.values())} != nvidia-smi's {sorted(smi.values())}")

        t2 = time.monotonic()
        sup.send_signal(signal.SIGTERM)
        code = sup.wait(120)
        print(f"SIGTERM: supervisor exited {code} after {time.monotonic() - t2:.1f} s", flush=True)
        if code != 0:
            problems.append(f"supervisor exit status {code}")
        for p in problems:
            print(f"PROBLEM: {p}", flush=True)
        ok = not problems
        print("GPU check " + ("passed" if ok else "FAILED"), flush=True)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        log.close()
        redis.stop()
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
