"""A training run's folder on shared storage, and what it says about itself.

Everything about a run lives in one folder, ``<storage root>/trained/<name>/``, so a run can be
listed, resumed, copied or deleted as a whole and every worker (all see the storage root) finds
the same models::

    run.json                        the configuration (template, data, hyperparameters, seed, classes)
    checkpoints/step-00000120.safetensors   weights + optimiser state; the step is in the name
    log.csv                         one row per step (loss; validation at the end of each epoch)
    tensorboard/                    event files, when the tensorboard package is installed

Nothing here imports torch or OpenImageIO: the catalog lists trained models from these files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mlfarm.storage import atomic_output, confined_path

TEMPLATES = ("img2img", "classify")
TRAINED_DIR = "trained"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
LOG_CSV = "log.csv"
TENSORBOARD_DIR = "tensorboard"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_CHECKPOINT = re.compile(r"^step-(\d+)\.safetensors$")


class RunError(ValueError):
    """A run that cannot be started, resumed or used; the message says what to change."""


@dataclass
class TrainConfig:
    """Everything that decides a run's result; stored in run.json and in every checkpoint."""

    name: str
    template: str
    data: str
    epochs: int = 10
    batch: int = 8
    lr: float = 1e-3
    crop: int = 256
    seed: int = 0
    crops_per_image: int = 1
    features: int = 16
    classes: list[str] = field(default_factory=list)  # classify: folder names, in label order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check(self) -> None:
        """Refuse values that cannot train, naming the option."""
        check_name(self.name)
        if self.template not in TEMPLATES:
            raise RunError(f"unknown template {self.template!r} (templates: {', '.join(TEMPLATES)})")
        for option, value, low in (("--epochs", self.epochs, 1), ("--batch", self.batch, 1), ("--crop", self.crop, 8),
                                   ("--crops-per-image", self.crops_per_image, 1), ("--features", self.features, 1)):
            if value < low:
                raise RunError(f"{option} must be at least {low} (got {value})")
        if self.crop % 8:
            raise RunError(f"--crop must be a multiple of 8 (got {self.crop}): the networks halve it three times")
        if not self.lr > 0:
            raise RunError(f"--lr must be positive (got {self.lr})")


def check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise RunError(f"run name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit "
                       "(it becomes the model's name in the catalog)")




def trained_root(storage_root: str | os.PathLike[str]) -> Path:
    return Path(storage_root) / TRAINED_DIR


def run_dir(storage_root: str | os.PathLike[str], name: str) -> Path:
    check_name(name)
    return trained_root(storage_root) / name


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of a run's checkpoints, oldest first; temporaries of killed writers are ignored."""
    ckpt_dir = Path(folder) / CHECKPOINT_DIR
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), ckpt_dir / n) for n in names if (m := _CHECKPOINT.match(n))]
    return sorted(found)


def newest_checkpoint(folder: str | os.PathLike[str]) -> tuple[int, Path] | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def read_config(folder: str | os.PathLike[str]) -> TrainConfig:
    path = Path(folder) / RUN_FILE
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise RunError(f"{folder}: not a training run (no {RUN_FILE})") from None
    except (ValueError, TypeError) as exc:
        raise RunError(f"{path}: unreadable run configuration: {exc}") from None


def write_config(folder: str | os.PathLike[str], root: str | os.PathLike[str], config: TrainConfig) -> None:
    """Write run.json atomically; the run folder must lie under the storage root."""
    text = json.dumps(config.to_dict(), indent=1, sort_keys=True)
    with atomic_output(Path(folder) / RUN_FILE, root) as tmp:
        tmp.write_text(text, encoding="utf-8")


def trained_runs(storage_root: str | os.PathLike[str]) -> dict[str, Path]:
    """Runs that can be used as models: a run.json and at least one checkpoint."""
    root = trained_root(storage_root)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in entries:
        folder = Path(entry.path)
        if _NAME.match(entry.name) and (folder / RUN_FILE).is_file() and list_checkpoints(folder):
            out[entry.name] = folder
    return out


def prepare_run_dir(storage_root: str | os.PathLike[str], name: str) -> Path:
    """The run's folder, created, and refused if a symlink leads it out of the storage root."""
    folder = run_dir(storage_root, name)
    (folder / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    confined_path(folder / CHECKPOINT_DIR, storage_root)
    return folder
