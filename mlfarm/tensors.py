"""Telling torch tensors apart from numpy arrays without importing torch.

Core, so the EXR writers, the model API and the gateway share one test; importing torch would
cost seconds in processes (the CLI, Nuke) that never touch a tensor.
"""

from __future__ import annotations

from typing import Any


def is_tensor(value: Any) -> bool:
    """Whether a model's output is a torch tensor (told apart without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "device")
