"""How many threads of each kind a worker process runs, from the cores it has: one decision, made once.

A worker process runs several pools at once: Celery's task threads (``worker_threads`` tasks in
flight), the I/O threads that read and write frames, OpenImageIO's OpenEXR pool decoding reads,
and torch's intra-op (one operator on several cores) and inter-op pools. Each library sizes its
own pool to every core, so on a small CPU machine they competed for the same cores: on the 2-core
development machine the farm blurred at half the speed of a plain loop (issue #25). ``plan``
sizes them together; ``apply`` sets them up at process start, before torch runs anything.

The choices were measured (docs/benchmarks.md, "CPU workers"), not guessed: a CPU worker runs two
chunks side by side, torch on half the cores each. GPU workers keep what
was measured good there (three tasks in flight on H100s, an I/O thread a core, torch and OpenEXR on
every core: the GPU does the model's work, torch's CPU threads mostly wait).
Explicit settings (MLFARM_WORKER_THREADS, MLFARM_IO_THREADS, MLFARM_EXR_THREADS,
MLFARM_TORCH_THREADS) override each choice, and the plan says which were overridden.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from mlfarm.cpus import available_cpus
from mlfarm.settings import Settings

log = logging.getLogger(__name__)

#: Tasks in flight on a GPU worker (Settings.worker_threads): measured with Mask R-CNN on an H100.
GPU_TASKS = 3


@dataclass(frozen=True)
class Plan:
    cores: int  # the cores this process sizes for (its affinity, shared among prefork children)
    device: str  # "cpu" or "cuda": where its models run
    tasks: int  # tasks in flight (Celery's threads pool; 1: the solo pool)
    io_threads: int  # threads reading and writing frames
    torch_threads: int  # torch's intra-op threads
    interop_threads: int  # torch's inter-op threads
    exr_threads: int  # OpenImageIO's OpenEXR pool decoding reads; -1: none (each I/O thread decodes its own)
    why: str

    def describe(self) -> str:
        """The plan in one line, as the worker's first log line says it."""
        return (f"sized for {self.cores} core{'s' if self.cores != 1 else ''} ({self.device}): "
                f"{self.tasks} task{'s' if self.tasks != 1 else ''} in flight, {self.io_threads} I/O threads, "
                f"torch {self.torch_threads} intra-op / {self.interop_threads} inter-op threads, "
                f"OpenEXR {self.exr_threads if self.exr_threads >= 0 else 'no'} threads; {self.why}")


def plan(cores: int, device: str, *, processes: int = 1, tasks: int = 0, io_threads: int = 0,
         torch_threads: int = 0, exr_threads: int = 0) -> Plan:
    """The plan for one worker process on ``cores`` cores, with models on ``device`` ("cpu" or
    "cuda"), one of ``processes`` prefork children sharing the cores (each takes one task at a
    time). Every other argument: 0 chooses, any other value is an explicit setting kept as it is
    (``exr_threads`` -1: no OpenEXR pool)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, not {device!r}")
    cores = max(1, cores // max(1, processes))
    if device == "cuda":
        # An I/O thread a core: depth decoding grainy plates ran 1.15x faster than with the cores less
        # two (its I/O threads were the limit, the cores 60% busy), Mask R-CNN within noise (0.98x); the
        # I/O threads are niced (MLFARM_IO_NICE), so the thread feeding the GPU still gets a core first.
        auto = {"tasks": GPU_TASKS, "io_threads": max(2, cores), "torch_threads": cores, "exr_threads": cores}
        why = (f"GPU worker: {GPU_TASKS} tasks overlap chunk boundaries (measured best on H100s), an I/O thread a "
               "core (niced: the thread feeding the GPU goes first), torch and OpenEXR on every core (torch's CPU "
               "threads mostly wait)")
        interop = cores
    else:
        # Two chunks side by side, each torch operator on half the cores: while one chunk reads or
        # writes (OpenEXR, outside torch) the other infers, and together they fill the cores. With one
        # chunk and torch on every core, the I/O threads preempt torch's OpenMP threads, which then
        # wait on one another: on 2 cores the farm ran at 0.73-1.12x a plain loop that way, at
        # 0.98-1.07x this way (docs/benchmarks.md, "CPU workers"). OpenEXR decodes each frame on the
        # thread that reads it: no third pool.
        side = 2 if cores >= 2 and processes == 1 else 1  # a prefork child takes one at a time
        auto = {"tasks": side, "io_threads": 2, "torch_threads": max(1, cores // side), "exr_threads": -1}
        why = (f"CPU worker: {side} task{'s' if side > 1 else ''} side by side, torch on "
               f"{max(1, cores // side)} of the cores each, 2 I/O threads, OpenEXR decoding on the reading "
               "thread (measured on 2 cores, docs/benchmarks.md)")
        interop = 1  # eager inference runs no inter-op work; one thread instead of one per core
    if processes > 1:
        auto["tasks"] = 1
        why += f"; one of {processes} prefork processes sharing the cores"
    given = {"tasks": tasks, "io_threads": io_threads, "torch_threads": torch_threads, "exr_threads": exr_threads}
    overridden = [name for name, value in given.items() if value]
    chosen = {name: (value or auto[name]) for name, value in given.items()}
    if processes > 1:
        chosen["tasks"] = 1  # a prefork child takes one task at a time whatever worker_threads says
    if overridden:
        why += "; set explicitly: " + ", ".join(f"{name}={given[name]}" for name in overridden)
    return Plan(cores=cores, device=device, interop_threads=min(interop, chosen["torch_threads"]), why=why,
                **chosen)


def worker_device(settings: Settings, gpu: int | None = None) -> str:
    """Where this worker's models will run, known before any model is loaded and without starting
    CUDA: MLFARM_DEVICE, a GPU it was pinned to, or (auto) whether torch sees a GPU, which it
    answers through NVML without initialising CUDA (safe before prefork forks)."""
    if settings.device == "cpu":
        return "cpu"
    if settings.device == "cuda" or gpu is not None:
        return "cuda"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.device_count() > 0 else "cpu"


def plan_for(settings: Settings, device: str, processes: int = 1, cores: int | None = None) -> Plan:
    """``plan`` for this process: its cores (affinity), and the settings' explicit values."""
    return plan(len(available_cpus()) if cores is None else cores, device, processes=processes,
                tasks=settings.worker_threads, io_threads=settings.io_threads, torch_threads=settings.torch_threads,
                exr_threads=settings.exr_threads)


_applied: Plan | None = None  # this process's plan, once ``apply`` has run


def apply(p: Plan) -> None:
    """At process start, before torch is imported (the worker imports it only with its first model):
    torch's OpenMP and MKL pools start at the plan's size (it reads these variables when it starts),
    and prefork children inherit them; torch is sized now if something imported it already, else
    by ``apply_torch`` as models load (``ModelCache``)."""
    global _applied
    _applied = p
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(p.torch_threads)
    apply_torch()


def applied() -> Plan | None:
    return _applied


def apply_torch() -> None:
    """Size torch's pools to this process's plan, if there is one and torch is imported. Called
    before and after each model loads: cheap when they already match. Inter-op threads can only be
    set before torch first uses them; eager inference does not, so the first call does it."""
    p = _applied
    if p is None or "torch" not in sys.modules:
        return
    import torch

    if torch.get_num_threads() != p.torch_threads:
        torch.set_num_threads(p.torch_threads)
    if torch.get_num_interop_threads() != p.interop_threads:
        try:
            torch.set_num_interop_threads(p.interop_threads)
        except RuntimeError as exc:  # already used: too late, and harmless to say so
            log.warning("torch's inter-op threads stay at %d: %s", torch.get_num_interop_threads(), exc)
