"""What a worker tells the farm about itself: host, GPU, tags and facts, the queues it consumes.

Tags are what jobs require (``mlfarm submit --require 80gb,h200``; broker/requirements.py): given
with ``mlfarm worker --tags`` or ``MLFARM_WORKER_TAGS``, else derived from the GPU: its memory
class (``80gb``: the smallest of the sizes GPUs are sold with that holds what the card reports),
its model (``h200``) and ``gpu``; a CPU worker is ``cpu``. Facts are numbers a requirement can
compare (``gpu_memory_gb>=24``): ``gpu_memory_gb`` (0 on a CPU worker) and ``cores``.

The GPU is asked with nvidia-smi, or torch in a throwaway process, so CUDA is never initialised in
a worker that forks (``--concurrency N``).

The description is published with the worker's holdings heartbeat (``NodeBeat``, worker/heartbeat.py),
which also watches the farm's requirement queues and has the worker consume each new one it
satisfies: chunks reach a worker by Celery routing, never by the worker turning them away.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from mlfarm.broker.requirements import normalise, requirement_queues, satisfied, split_queue
from mlfarm.broker.workers import WorkerInfo, publish_node
from mlfarm.cpus import available_cpus
from mlfarm.settings import Settings

log = logging.getLogger(__name__)

#: Memory sizes GPUs are sold with, in GB; a card reports a little less (an H100 80GB: 79.6 GiB).
MEMORY_CLASSES = (2, 3, 4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 180, 192, 288)
#: Words in a GPU's name that say nothing about which GPU it is.
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "intel", "graphics"}
_CONNECTOR = re.compile(r"^(pcie|sxm\d*|nvl|hbm\d*e?|\d+gb|mig|max-q)$")


def memory_class(gib: float) -> str:
    """``80gb`` for a card reporting 79.6 GiB: the smallest class that holds it, less 3% slack."""
    for size in MEMORY_CLASSES:
        if gib <= size * 1.03 and gib >= size * 0.85:
            return f"{size}gb"
    return f"{round(gib)}gb"


def model_tag(name: str) -> str:
    """``h100`` for "NVIDIA H100 80GB HBM3", ``rtx4090`` for "NVIDIA GeForce RTX 4090", ``a100`` for
    "NVIDIA A100-SXM4-80GB", ``l40s`` for "NVIDIA L40S"; "" when the name has no model in it."""
    words = [w for w in re.split(r"[\s_]+", name.lower()) if w and w not in _VENDOR_WORDS]
    prefix = ""
    for word in words:
        head = word.split("-")[0]
        if _CONNECTOR.match(head):
            continue
        if any(c.isdigit() for c in head):
            return re.sub(r"[^a-z0-9]", "", prefix + head)
        if head in ("rtx", "gtx", "titan"):
            prefix = head
    return ""


def default_tags(gpu_name: str, memory_bytes: int | None) -> list[str]:
    """The tags a worker has when none are given: ``cpu`` without a GPU, else its memory class,
    its model and ``gpu``."""
    if not gpu_name and not memory_bytes:
        return ["cpu"]
    tags = {"gpu"}
    if memory_bytes:
        tags.add(memory_class(memory_bytes / 2**30))
    if gpu_name and model_tag(gpu_name):
        tags.add(model_tag(gpu_name))
    return sorted(tags)


def gpu_properties() -> tuple[str, int] | None:
    """(name, total memory in bytes) of the first GPU this process sees, without initialising CUDA
    here; None where there is none or neither nvidia-smi nor torch can tell."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = (visible or "0").split(",")[0].strip()
    if visible is not None and (not first or first.startswith("-")):
        return None
    exe = shutil.which("nvidia-smi")
    if exe and not first.startswith("MIG-"):
        try:
            out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "-i", first],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            name, mib = out.strip().splitlines()[0].rsplit(",", 1)
            return name.strip(), int(float(mib) * 2**20)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            log.info("nvidia-smi could not describe GPU %s (%s); asking torch", first, exc)
    probe = ("import torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
             "print(repr((p.name, p.total_memory)) if p else '')")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not describe the GPU: %s", exc)
        return None
    if not out:
        return None
    name, total = out.strip("()").rsplit(",", 1)
    return name.strip().strip("'\""), int(total)


def describe_worker(settings: Settings, name: str, device: str, queues: Iterable[str],
                    tags: str | None = None) -> WorkerInfo:
    """This worker as the farm sees it. ``device``: ``cuda`` or ``cpu`` (worker/sizing.py);
    ``tags``: given ones (``--tags``), else ``MLFARM_WORKER_TAGS``, else derived."""
    gpu = gpu_properties() if device == "cuda" else None
    gpu_name, memory = gpu if gpu else ("", 0)
    given = tags if tags is not None else settings.worker_tags
    chosen = normalise(given) if given and given.strip() else default_tags(gpu_name, memory)
    facts = {"gpu_memory_gb": round(memory / 2**30, 1), "cores": len(available_cpus())}
    return WorkerInfo(name=name, host=socket.gethostname(), gpu=gpu_name, tags=chosen, facts=facts,
                      queues=sorted(set(queues)), started=time.time())


def wanted_queues(info: WorkerInfo, all_queues: Iterable[str]) -> list[str]:
    """The requirement queues among ``all_queues`` this worker consumes: those of a plain queue it
    consumes whose requirement it satisfies."""
    out = []
    for name in all_queues:
        base, items = split_queue(name)
        if items and base in info.queues and satisfied(items, info.tags, info.facts):
            out.append(name)
    return sorted(out)


@dataclass
class NodeBeat:
    """Publishes the worker's description and, on each beat, starts consuming new requirement queues
    it satisfies (``subscribe(queue) -> bool``: whether the worker confirmed)."""

    client: redis.Redis
    info: WorkerInfo
    ttl: float
    subscribe: Callable[[str], bool] = lambda queue: False
    asked: set[str] = field(default_factory=set)

    def __call__(self) -> None:
        publish_node(self.client, self.info, self.ttl)
        for queue in wanted_queues(self.info, requirement_queues(self.client)):
            if queue in self.info.requirement_queues or queue in self.asked:
                continue
            self.asked.add(queue)
            try:
                ok = self.subscribe(queue)
            except Exception as exc:  # asked again on the next beat
                log.warning("worker %s could not start consuming queue %s: %s", self.info.name, queue, exc)
                ok = False
            if ok:
                self.info.requirement_queues = sorted({*self.info.requirement_queues, queue})
                log.info("worker %s takes jobs requiring %s now (queue %s)", self.info.name,
                         ", ".join(split_queue(queue)[1]), queue)
                publish_node(self.client, self.info, self.ttl)
            else:
                self.asked.discard(queue)
