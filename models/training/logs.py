"""A run's training log on shared storage: CSV always, TensorBoard event files when available.

Resuming from a checkpoint drops the rows after that checkpoint's step (they belong to a
continuation that was lost), so the CSV always describes one unbroken run.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import IO, Any

from mlfarm.storage import atomic_output, confined_path

from .runs import LOG_CSV, TENSORBOARD_DIR

log = logging.getLogger(__name__)

COLUMNS = ("step", "epoch", "loss", "val_loss", "val_accuracy", "lr", "time")


def read_log(folder: str | os.PathLike[str]) -> list[dict[str, str]]:
    try:
        with open(Path(folder) / LOG_CSV, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _tensorboard_writer(folder: Path, root: str | os.PathLike[str], purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: `pip install tensorboard` turns event files on
        return None
    return SummaryWriter(log_dir=str(confined_path(folder / TENSORBOARD_DIR, root)), purge_step=purge_step)


class TrainLog:
    def __init__(self, folder: Path, root: str | os.PathLike[str], resume_step: int):
        self.path = confined_path(folder / LOG_CSV, root)
        kept = [row for row in read_log(folder) if int(row.get("step") or 0) <= resume_step]
        with atomic_output(self.path, root) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in kept)
        self._file: IO[str] = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - held for the run
        self._csv = csv.DictWriter(self._file, COLUMNS)
        self.tensorboard = _tensorboard_writer(folder, root, resume_step + 1)

    def row(self, step: int, epoch: int, loss: float, lr: float, when: float, val_loss: float | None = None,
            val_accuracy: float | None = None) -> None:
        """One step's row (``when``: the step's wall-clock time); written out by :meth:`flush`."""
        def fmt(v: float | None) -> str:
            return "" if v is None or math.isnan(v) else f"{v:.6g}"

        self._csv.writerow({"step": step, "epoch": epoch, "loss": fmt(loss), "val_loss": fmt(val_loss),
                            "val_accuracy": fmt(val_accuracy), "lr": f"{lr:.6g}", "time": f"{when:.3f}"})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss/train", loss, step, walltime=when)
            if val_loss is not None:
                self.tensorboard.add_scalar("loss/val", val_loss, step, walltime=when)
            if val_accuracy is not None:
                self.tensorboard.add_scalar("accuracy/val", val_accuracy, step, walltime=when)

    def flush(self) -> None:
        self._file.flush()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
