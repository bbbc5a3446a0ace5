"""CPU placement: which cores a worker process may run on.

A GPU worker is CPU-bound on EXR encoding as much as on its GPU, so on a host with several
GPUs each worker gets its own share of the cores (as a Deadline or OpenCue wrangler would pin
them): two workers then do not fight over the same cores, and one GPU's figure is what every
GPU of the host gets.
"""

from __future__ import annotations

import os


class CpuSpecError(ValueError):
    pass


def available_cpus() -> list[int]:
    """The cores this process may run on (its affinity, e.g. a container's cpuset), in order;
    every core where the system has no affinity (macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_cpus(spec: str, check: bool = True) -> list[int]:
    """``0-7,16-23`` (the taskset / cpuset syntax) as a sorted list of core numbers; with ``check``,
    only cores this process may run on (not for a spec meant for another machine)."""
    cpus: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise CpuSpecError(f"--cpus {spec!r}: expected cores like 0-7,16-23") from None
        if first < 0 or last < first:
            raise CpuSpecError(f"--cpus {spec!r}: bad range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise CpuSpecError(f"--cpus {spec!r}: names no core")
    missing = sorted(cpus - set(available_cpus())) if check else []
    if missing:
        raise CpuSpecError(f"--cpus {spec!r}: cores {format_cpus(missing)} are not available to this process "
                           f"(available: {format_cpus(available_cpus())})")
    return sorted(cpus)


def format_cpus(cpus: list[int]) -> str:
    """The inverse of ``parse_cpus``: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    parts, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def split_cpus(n: int, cpus: list[int] | None = None) -> list[list[int]]:
    """``cpus`` (default: this process's) in ``n`` disjoint, contiguous, near-equal shares.

    Contiguous because neighbouring core numbers usually share a socket, as a GPU's PCIe root does.
    """
    cpus = available_cpus() if cpus is None else sorted(cpus)
    if n < 1 or len(cpus) < n:
        raise CpuSpecError(f"cannot give {n} workers a core each from {len(cpus)} cores")
    return [cpus[len(cpus) * i // n: len(cpus) * (i + 1) // n] for i in range(n)]


def pin_cpus(cpus: list[int]) -> None:
    """Run this process (and the threads and processes it starts from now on) on ``cpus`` only."""
    if not hasattr(os, "sched_setaffinity"):
        raise CpuSpecError("--cpus: this system cannot pin a process to cores (Linux can)")
    os.sched_setaffinity(0, cpus)
