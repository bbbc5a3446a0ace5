"""The SAM 2 plugin's own settings group: MLFARM_SAM2_* variables, ``sam2_*`` keys of mlfarm.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlfarm.settings import PluginSettings


class Sam2Settings(PluginSettings):
    sam2_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="SAM 2 arithmetic: bf16 on a GPU that supports it (auto), or fp32. The CPU "
        "always runs fp32. benchmarks/bench_sam2.py measures both, and how far their masks differ.")
    sam2_lanes: int = Field(
        default=1, ge=1, le=8, description="Shots a SAM 2 worker process steps at once, each on its own thread and "
        "CUDA stream (with MLFARM_WORKER_THREADS at least as many), so the GPU works on one while Python "
        "dispatches another. CPU: always 1.")
    sam2_cuda_graphs: bool = Field(
        default=True, description="Replay SAM 2's image encoder as a CUDA graph on a GPU (one call instead of "
        "hundreds of kernel launches a frame); false: eager, to compare or to rule it out.")
