"""The depth plugin's own settings group: MLFARM_DEPTH_* variables, ``depth_*`` keys of mlfarm.toml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlfarm.settings import PluginSettings


class DepthSettings(PluginSettings):
    depth_batch_size: int = Field(
        default=4, ge=1, le=64, description="Frames Depth Anything runs through the network at once.")
    depth_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="Depth Anything arithmetic: bf16 autocast on a GPU that supports it (auto), "
        "or fp32. The CPU always runs fp32. benchmarks/bench_passes.py measures both and the largest difference.")
    depth_cuda_graphs: bool = Field(
        default=False, description="Replay Depth Anything's network (fixed batch and frame size) as one CUDA graph "
        "per lane instead of hundreds of Python-dispatched operations, which compete for the GIL with the worker's "
        "I/O threads (CUDA only; a capture that fails runs eagerly). benchmarks/bench_passes.py measures it "
        "(c_graphs).")
