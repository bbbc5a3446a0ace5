"""Mask R-CNN's own settings group: MLFARM_MRCNN_* variables, ``mrcnn_*`` keys of mlfarm.toml.

Declared as the plugin's ``settings_class``; the worker reads it when it loads the model and
hands it over in the load context, so the core ``Settings`` knows nothing of Mask R-CNN.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlfarm.settings import PluginSettings


class MrcnnSettings(PluginSettings):
    mrcnn_precision: Literal["fp32", "tf32", "fp16"] = Field(
        default="tf32",
        description="Mask R-CNN arithmetic on CUDA: fp32, tf32 (TF32 matmuls and convolutions) or fp16 (autocast). "
        "Chosen by measurement (benchmarks/bench_mrcnn.py); CPU always runs fp32.",
    )
    mrcnn_channels_last: bool = Field(default=False, description="Mask R-CNN backbone in channels_last on CUDA.")
    mrcnn_cuda_graphs: bool = Field(
        default=False, description="Replay Mask R-CNN's fixed-shape front (sRGB, resize, backbone, RPN head, "
        "anchors) as one CUDA graph per lane and frame size instead of hundreds of Python-dispatched operations "
        "(CUDA only). Measured on an H100 at 1080p: one worker 1.05-1.12x the frames/s in 2 runs of 3 (0.82x in "
        "the other), two workers per GPU no change; each graph keeps 6-12 GiB of GPU memory, so it is off by default.",
    )
    mrcnn_batch_size: int = Field(
        default=4, ge=1, le=64, description="Frames Mask R-CNN runs through the network at once (4 measured best "
        "on H100: 8 ran the network 4% faster but the farm 9-21% slower).",
    )
    mrcnn_lanes: int = Field(
        default=2, ge=1, le=8, description="Batches of a Mask R-CNN worker in the network at once, each on its own "
        "thread and CUDA stream, so the GPU works on one while Python dispatches another (CPU: always 1). "
        "Measured on H200 with GPU compression: 2 lanes 1.06-1.07x the frames/s of 1; with CPU compression no change.",
    )
