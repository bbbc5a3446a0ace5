"""`mlfarm worker --gpus`: one worker process per GPU (or ``MLFARM_WORKERS_PER_GPU``), kept alive,
stopped together.

A GPU worker is one process holding one CUDA context (see ``run_worker``), so
a multi-GPU host runs one such process per card; several per card where one Python process
cannot keep its GPU busy (each has its own GIL; see the README's Mask R-CNN speed section). The
supervisor never imports torch or touches CUDA itself: it counts GPUs with ``nvidia-smi`` (or
``torch`` in a throwaway subprocess) and pins each child with ``CUDA_VISIBLE_DEVICES`` before the
child starts.

Children run in their own session, so a terminal's Ctrl-C reaches only the supervisor, which then
sends exactly one signal: the first SIGTERM/SIGINT is passed on as SIGTERM (Celery's warm
shutdown: a running chunk finishes, queued ones stay queued); a second one kills the children
(SIGKILL): their running chunks stay unacknowledged and Redis redelivers them after the visibility
timeout. Never SIGQUIT: Celery's cold shutdown stops the running chunks between frames and
acknowledges them as failed; they hand their other frames back, but a warm shutdown wastes nothing. If the
supervisor is killed outright, each child gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``), so
no orphan keeps a GPU busy. Either way a chunk is finished or redelivered, never lost.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

from mlfarm.broker.connection import broker_url
from mlfarm.cpus import format_cpus, pin_cpus, split_cpus
from mlfarm.settings import AUTO_TWO_MIN_CORES, AUTO_TWO_MIN_GPU_GIB, Settings

from .main import ordered_queues
from .watchdog import EXIT_HUNG

log = logging.getLogger(__name__)

#: `mlfarm worker` exits 2 when it refuses its configuration: restarting it cannot help.
REFUSED_EXIT = 2
#: A child that ran this long before dying is considered healthy again: its restart wait resets.
STABLE_AFTER_S = 60.0
FIRST_RESTART_DELAY_S = 1.0
POLL_S = 0.2

_GPU_ID = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$")
_PR_SET_PDEATHSIG = 1


class GpuSpecError(ValueError):
    """A ``--gpus`` value that names no usable GPU; the message says what to pass instead."""


# --- which GPUs ------------------------------------------------------------------------------
def _nvidia_smi_indices() -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s); asking torch instead", exc)
        return None
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def _torch_indices() -> list[str]:
    """Counted by torch in a child process, so CUDA is never initialised in the supervisor."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             check=True).stdout
        return [str(i) for i in range(int(out.strip().splitlines()[-1]))]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        log.warning("could not count GPUs with torch: %s", exc)
        return []


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as ids that pin one of them when put in CUDA_VISIBLE_DEVICES.

    An inherited CUDA_VISIBLE_DEVICES (a scheduler's, or a container's) is respected: its entries
    are the visible GPUs. Otherwise nvidia-smi's indices, which follow PCI bus order; children get
    CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA numbers the cards the same way.
    """
    env = os.environ if env is None else env
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        ids: list[str] = []
        for token in (t.strip() for t in inherited.split(",")):
            if not token or token.startswith("-"):
                break  # CUDA stops at the first invalid entry; "-1" and "" hide every GPU
            ids.append(token)
        return ids
    found = _nvidia_smi_indices()
    return found if found is not None else _torch_indices()


def gpu_memory_gib(gpus: list[str]) -> list[float | None]:
    """Total memory of each GPU (ids as ``CUDA_VISIBLE_DEVICES`` takes them), from nvidia-smi or
    torch in one throwaway subprocess; None where neither can tell. A MIG slice is asked of torch:
    nvidia-smi's ``--query-gpu`` speaks of whole GPUs."""
    exe = shutil.which("nvidia-smi")
    if exe and not any(g.startswith("MIG-") for g in gpus):
        try:
            out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i",
                                  ",".join(gpus)], capture_output=True, text=True, timeout=30, check=True).stdout
            from_smi: list[float | None] = [float(line) / 1024 for line in out.split()]
            if len(from_smi) == len(gpus):
                return from_smi
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.info("nvidia-smi could not tell the GPUs' memory (%s); asking torch", exc)
    probe = ("import torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
             "print(*(torch.cuda.get_device_properties(i).total_memory for i in range(n)))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus),
                                  "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).stdout
        found: list[float | None] = [int(b) / 2**30 for b in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("could not tell the GPUs' memory: %s", exc)
        found = []
    return found if len(found) == len(gpus) else [None] * len(gpus)


def workers_per_gpu(setting: int | str, memory_gib: list[float | None], cores: int) -> tuple[int, str]:
    """How many worker processes share each GPU, and why. ``auto``: two where each GPU has the
    memory for two copies of the models and the host the cores for two processes' EXR work."""
    if setting != "auto":
        return int(setting), "MLFARM_WORKERS_PER_GPU"
    if not memory_gib or any(m is None for m in memory_gib):
        return 1, "auto: a GPU's memory is unknown"
    smallest = min(m for m in memory_gib if m is not None)
    if smallest < AUTO_TWO_MIN_GPU_GIB:
        return 1, f"auto: {smallest:.0f} GiB on a GPU, under {AUTO_TWO_MIN_GPU_GIB}"
    if cores < AUTO_TWO_MIN_CORES * len(memory_gib):
        return 1, f"auto: {cores} cores for {len(memory_gib)} GPU(s), under {AUTO_TWO_MIN_CORES} a GPU"
    return 2, f"auto: {smallest:.0f} GiB a GPU, {cores} cores"


def parse_gpus(spec: str, env: dict[str, str] | None = None) -> list[str]:
    """``all`` or a comma-separated list of GPU ids (indices, GPU-/MIG- UUIDs) -> the ids."""
    spec = spec.strip()
    if spec.lower() == "all":
        ids = visible_gpus(env)
        if not ids:
            raise GpuSpecError(
                "--gpus all: no GPU is visible here (nvidia-smi and torch found none, or CUDA_VISIBLE_DEVICES "
                "hides them). Check the NVIDIA driver / container GPU reservation, or name GPUs with --gpus 0,1")
        return ids
    ids = [t.strip() for t in spec.split(",")]
    bad = [t for t in ids if not _GPU_ID.match(t)]
    if bad or not ids:
        raise GpuSpecError(f"--gpus {spec!r}: expected 'all' or GPU ids like 0,1 (bad: {', '.join(bad) or 'empty'})")
    dupes = sorted({t for t in ids if ids.count(t) > 1})
    if dupes:
        raise GpuSpecError(f"--gpus {spec!r}: GPU {', '.join(dupes)} listed twice; one worker process per GPU")
    return ids


def child_name(template: str | None, gpu: str, position: int, many: bool, host: str | None = None,
               instance: int | None = None) -> str:
    """The Celery worker name for one GPU's process, as Flower shows it.

    Default ``mlfarm-gpu<N>@<host>``, or ``mlfarm-gpu<N>.<instance>@<host>`` where several
    processes share GPU N (``MLFARM_WORKERS_PER_GPU``). A given ``--name`` is used as is for a
    single GPU (a container that owns one card names it after the host's card; its processes
    sharing the card become ``name.<instance>@host``), and must hold ``{gpu}`` with several GPUs.
    """
    label = gpu if gpu.isdigit() else str(position)
    if instance is not None:
        label = f"{label}.{instance}"
    host = host or socket.gethostname()
    if not template:
        return f"mlfarm-gpu{label}@{host}"
    if "{gpu}" in template:
        return template.replace("{gpu}", label)
    if many:
        raise GpuSpecError(f"--name {template!r} with several GPUs: put {{gpu}} in it, e.g. render-gpu{{gpu}}@{host}")
    if instance is not None:
        local, at, domain = template.partition("@")
        return f"{local}.{instance}{at}{domain}"
    return template


# --- the children ----------------------------------------------------------------------------
def _pdeathsig_hook():
    """A pre-exec hook giving the child SIGTERM (warm shutdown) when the supervisor dies; Linux only.

    libc's prctl is looked up here, in the parent, so the forked child only makes the call.
    """
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the signal forwarding alone stops the children
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    term = int(signal.SIGTERM)
    return lambda: prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)


@dataclass
class Child:
    gpu: str | None  # None: a local worker (`mlfarm up`, the demo), pinned to no GPU
    name: str
    argv: list[str]
    env: dict[str, str]
    output: IO[bytes] | None = None  # where its stdout and stderr go; None: the supervisor's
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None
    delay: float = FIRST_RESTART_DELAY_S
    retired: bool = False
    starts: int = 0
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_pdeathsig_hook(), stdout=self.output,
                                     stderr=subprocess.STDOUT if self.output else None)
        self.started = time.monotonic()
        self.restart_at = None
        self.starts += 1
        self.pids.append(self.proc.pid)
        log.info("supervisor: started %s%s (pid %d)", self.name, self.where, self.proc.pid)

    @property
    def where(self) -> str:
        return f" on GPU {self.gpu}" if self.gpu is not None else ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_HUNG:
        return f"exit status {code}: it failed a frame stuck past MLFARM_FRAME_TIME_LIMIT (its log names it)"
    return f"exit status {code}"


class Supervisor:
    """Runs worker processes until told to stop: `mlfarm worker --gpus` (one child per GPU, see the
    module docstring for the signal rules, ``run``) and `mlfarm up` and the demo (``LocalFarm``,
    which calls ``start``, ``poll`` and ``stop`` itself).

    With ``restart_only_hung`` (local farms) a child that ended itself over a stuck frame is
    started again at once and any other exit stops the farm; otherwise children are restarted with
    a growing wait, a clean exit retires one and a refused configuration stops them all.
    """

    def __init__(self, children: list[Child], max_restart_delay: float = 60.0, restart_only_hung: bool = False):
        self.children = children
        self.max_restart_delay = max_restart_delay
        self.restart_only_hung = restart_only_hung
        self.signals_received = 0
        self.fatal: str | None = None

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals_received += 1

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start(self) -> None:
        for child in self.children:
            child.start()

    def poll(self, stopping: bool = False) -> bool:
        """Notice children that ended and start again those due; whether any child is left to run."""
        now = time.monotonic()
        for child in self.children:
            stopping = stopping or self.fatal is not None
            if child.proc is not None and child.proc.poll() is not None:
                self._exited(child, child.proc.returncode, stopping, now)
                stopping = stopping or self.fatal is not None
            if not stopping and child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.start()
        return not (all(c.proc is None for c in self.children) and (
            stopping or self.fatal is not None or all(c.retired for c in self.children)))

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown: SIGTERM to every child, SIGKILL to those still running after ``timeout``."""
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def _supervise(self) -> int:
        self.start()
        forwarded = 0
        while True:
            if self.signals_received > forwarded:
                forwarded = self.signals_received
                self._forward(signal.SIGTERM if forwarded == 1 else signal.SIGKILL)
            if not self.poll(stopping=forwarded > 0):
                break
            time.sleep(POLL_S)
        if self.fatal:
            log.error("supervisor: %s", self.fatal)
            return REFUSED_EXIT
        log.info("supervisor: all workers stopped")
        return 0

    def _forward(self, sig: int) -> None:
        how = "warm shutdown: running chunks finish" if sig == signal.SIGTERM else \
            "killing them: Redis redelivers their running chunks after MLFARM_VISIBILITY_TIMEOUT"
        log.info("supervisor: stopping %d worker(s) (%s)", len(self.children), how)
        for child in self.children:
            child.restart_at = None
            child.signal(sig)

    def _exited(self, child: Child, code: int, stopping: bool, now: float) -> None:
        pid = child.proc.pid if child.proc else -1
        child.proc = None
        what = f"{child.name} ({f'GPU {child.gpu}, ' if child.gpu is not None else ''}pid {pid}) {describe_exit(code)}"
        if stopping:
            log.log(logging.INFO if code == 0 else logging.WARNING, "supervisor: %s", what)
            return
        if self.restart_only_hung:
            if code == EXIT_HUNG:
                log.warning("worker %s failed a frame stuck past its time limit and ended; starting it again",
                            child.name.split("@")[0])
                child.restart_at = now
            else:
                self.fatal = f"{what}: a farm process exited unexpectedly"
            return
        if code == 0:
            child.retired = True
            log.warning("supervisor: %s: it was asked to shut down, not restarting it", what)
            return
        if code == REFUSED_EXIT:
            self.fatal = f"{what}: it refused its configuration (see its message above); stopping all workers"
            self._forward(signal.SIGTERM)
            return
        if now - child.started >= STABLE_AFTER_S:
            child.delay = FIRST_RESTART_DELAY_S
        wait = child.delay
        child.delay = min(child.delay * 2, self.max_restart_delay)
        child.restart_at = now + wait
        log.warning("supervisor: %s; restarting it in %.0f s", what, wait)


def build_children(gpus: list[str], queues: list[str], worker_args: list[str], name_template: str | None,
                   env: dict[str, str] | None = None, cpu_shares: list[list[int]] | None = None,
                   per_gpu: int = 1) -> list[Child]:
    """``per_gpu`` children per GPU: ``python -m mlfarm worker --queues ... <worker_args> --name
    <name>`` pinned to it, and child i to ``cpu_shares[i]`` (its cores) where given. Only the first
    child of a GPU takes the ``train`` queue: a training run takes its whole GPU."""
    base = dict(os.environ if env is None else env)
    base.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    base.setdefault("MLFARM_LOG_LEVEL", logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    children = []
    for position, gpu in enumerate(gpus):
        for instance in range(per_gpu):
            taken = [q for q in queues if instance == 0 or q != "train"]
            if not taken:
                continue
            name = child_name(name_template, gpu, position, len(gpus) > 1, instance=instance if per_gpu > 1 else None)
            argv = [sys.executable, "-m", "mlfarm", "worker", "--queues", ",".join(taken), *worker_args,
                    "--name", name]
            if cpu_shares:
                argv += ["--cpus", format_cpus(cpu_shares[len(children)])]
            children.append(Child(gpu=gpu, name=name, argv=argv, env={**base, "CUDA_VISIBLE_DEVICES": gpu}))
    names = [c.name for c in children]
    if len(set(names)) != len(names):
        raise GpuSpecError(f"worker names would repeat ({', '.join(names)}): give --name a {{gpu}} placeholder")
    return children


def run_gpu_workers(settings: Settings, gpus_spec: str, queues: str, concurrency: int = 1,
                    name_template: str | None = None, loglevel: str = "INFO", cpus: list[int] | None = None) -> int:
    """Start ``settings.workers_per_gpu`` ``mlfarm worker`` processes per GPU in ``gpus_spec`` and
    supervise them; returns the exit status.

    The broker and queues are checked here first, so a bad configuration is one clear error
    rather than the same refusal from every child.
    """
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # the few lifecycle lines are what a wrangler reads in `docker logs`
    broker_url(settings)
    ordered = ordered_queues([q.strip() for q in queues.split(",") if q.strip()])
    worker_args = ["--concurrency", str(concurrency), "--loglevel", loglevel]
    gpus = parse_gpus(gpus_spec)
    if cpus:
        pin_cpus(cpus)  # the children inherit it; shared out below, or all theirs with MLFARM_SPLIT_CPUS=false
    memory = gpu_memory_gib(gpus) if settings.workers_per_gpu == "auto" else []
    per_gpu, why = workers_per_gpu(settings.workers_per_gpu, memory, len(os.sched_getaffinity(0)))
    if ordered == ["train"]:
        per_gpu = 1  # only the first process of a GPU trains (see build_children)
    count = len(gpus) * per_gpu
    shares = split_cpus(count) if settings.split_cpus and count > 1 else None
    children = build_children(gpus, ordered, worker_args, name_template, cpu_shares=shares, per_gpu=per_gpu)
    placed = [f"{c.name}=GPU {c.gpu}" + (f" cores {format_cpus(shares[i])}" if shares else "")
              for i, c in enumerate(children)]
    log.info("supervisor: %s (%s): %s", "one worker per GPU" if per_gpu == 1 else f"{per_gpu} workers per GPU",
             why, ", ".join(placed))
    return Supervisor(children, settings.supervisor_max_restart_delay).run()
