"""How a training run reports to, and is stopped by, whoever runs it (torch-free, so the worker
imports it cheaply and loads the trainer only when a training task arrives)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """Where a run is; what `mlfarm status` shows for a training job."""

    step: int
    total_steps: int
    epoch: int
    epochs: int
    loss: float | None = None  # mean training loss of the current epoch so far
    val_loss: float | None = None
    val_accuracy: float | None = None
    checkpoint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


class Stopped(Exception):
    """Training stopped early on request (cancel, shutdown, time limit); a checkpoint was written first."""

    def __init__(self, reason: str, progress: Progress):
        super().__init__(reason)
        self.reason = reason
        self.progress = progress


class Hooks:
    """What the trainer tells, and asks, whoever runs it. The defaults do nothing."""

    def resumed(self, progress: Progress) -> None:
        """Called once before training: ``progress.step`` is the checkpoint's step (0 for a new run) and
        ``progress.epoch`` the epochs it completed."""

    def epoch_starting(self, epoch: int) -> bool:
        """False stops the run (e.g. the job was cancelled) before the epoch's first step."""
        return True

    def step_done(self, progress: Progress) -> None:
        pass

    def epoch_done(self, progress: Progress) -> None:
        """Called once the epoch's checkpoint is on disk."""

    def stop_reason(self) -> str | None:
        """Asked after every step; a reason makes the trainer checkpoint and raise :class:`Stopped`."""
        return None
