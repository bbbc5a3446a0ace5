"""GPU placement: which device a model runs on, and pinning a worker process to one GPU.

CUDA must never be initialised in a process that later forks workers (the children inherit a
broken context), so nothing here touches torch until a model is loaded inside the process that
runs it, and pinning works through ``CUDA_VISIBLE_DEVICES`` before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    pass


def pin_gpu(index: int | str) -> None:
    """Make only GPU ``index`` visible to this process (and its children)."""
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            raise DeviceError("cannot pin a GPU after CUDA was initialised in this process")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)


def torch_device(model_device: str, policy: str) -> str:
    """The torch device for a model that wants ``model_device`` ("gpu"/"cpu") under ``policy``.

    ``policy`` is the worker's MLFARM_DEVICE: "auto" uses CUDA when there is a GPU and falls back
    to the CPU (slower, same results); "cuda" insists; "cpu" never touches the GPU.
    """
    if model_device == "cpu" or policy == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if policy == "cuda":
        raise DeviceError("MLFARM_DEVICE=cuda but this worker sees no CUDA device")
    return "cpu"
