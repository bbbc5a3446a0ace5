"""Submitting a training run: everything is checked before the job is queued.

The data folder is checked from its image headers, the run name against the catalog and the
run folder on shared storage, and a resumed run against what it was trained with, so a refused
submission leaves no trace on the farm.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable
from typing import Any

from mlfarm.broker.celery_app import TRAIN_TASK, celery_priority
from mlfarm.broker.jobs import JobSpec
from mlfarm.keys import lease_key
from mlfarm.models.catalog import discover
from mlfarm.models.training.data import DataError, scan, steps_per_epoch
from mlfarm.models.training.runs import (
    RUN_FILE,
    RunError,
    TrainConfig,
    newest_checkpoint,
    read_config,
    run_dir,
)
from mlfarm.storage import StorageError, confined_path

log = logging.getLogger(__name__)

#: Options a resumed run may not change: they shape the network or the data it learns from.
FIXED_ON_RESUME = ("template", "data", "batch", "lr", "crop", "seed", "crops_per_image", "features")
TIME_LIMIT_GRACE = 300  # seconds past train_time_limit before a prefork worker kills the task outright


def new_seed() -> int:
    return secrets.randbelow(2**31)


def prepare(settings: Any, config: TrainConfig, resume: bool, explicit: Iterable[str] = ()) -> tuple[TrainConfig, int]:
    """The configuration to train, and the epochs already trained; RunError/DataError say why not.

    ``explicit`` names the options the user gave; with ``resume`` they may only change ``epochs``.
    """
    root = settings.storage_root
    folder = run_dir(root, config.name)
    try:
        confined_path(folder, root)
    except StorageError as exc:
        raise RunError(str(exc)) from None
    if config.name in discover(settings.model_dirs):
        raise RunError(f"{config.name!r} is the name of a model plugin; choose another --name")
    newest = newest_checkpoint(folder)
    if resume:
        if not (folder / RUN_FILE).is_file():
            raise RunError(f"no run {config.name!r} to resume (no {folder / RUN_FILE})")
        stored = read_config(folder)
        changed = [k for k in FIXED_ON_RESUME if k in explicit and getattr(config, k) != getattr(stored, k)]
        if changed:
            raise RunError(f"run {config.name} was trained with "
                           + ", ".join(f"--{k.replace('_', '-')} {getattr(stored, k)}" for k in changed)
                           + "; a resumed run keeps its settings (only --epochs may change)")
        stored.epochs = config.epochs if "epochs" in explicit else stored.epochs
        config = stored
    elif newest is not None:
        raise RunError(f"run {config.name} already exists with a checkpoint at step {newest[0]} ({folder}); "
                       "--resume continues it, or choose another --name")
    config.data = os.path.abspath(config.data)
    config.check()
    data = scan(config.data, config.template, config.crop)
    if resume and config.classes and data.classes != config.classes:
        raise DataError(f"{config.data}: classes {', '.join(data.classes)} differ from the run's "
                        f"{', '.join(config.classes)}")
    config.classes = data.classes
    done = 0
    if newest is not None:
        done = newest[0] // steps_per_epoch(len(data.train), config.batch, config.crops_per_image)
    if done >= config.epochs:
        raise RunError(f"run {config.name} has already trained {done} epochs; pass --epochs with more to go on")
    return config, done


def submit_training(farm: Any, config: TrainConfig, resume: bool = False, explicit: Iterable[str] = (),
                    priority: int = 50, name: str = "") -> JobSpec:
    """Queue a training job on the ``train`` queue; its frames are the epochs still to train."""
    if not 0 <= priority <= 100:
        raise RunError("priority must be between 0 and 100")
    config, done = prepare(farm.settings, config, resume, explicit)
    holder = farm.redis.get(lease_key(config.name))
    if holder:
        raise RunError(f"run {config.name} is being trained now (job {holder.split()[0]}); "
                       "wait for it, or cancel it first")
    folder = run_dir(farm.settings.storage_root, config.name)
    spec = JobSpec(model=config.name, input=config.data, output=str(folder), frames=list(range(done + 1,
                   config.epochs + 1)), options=config.to_dict(), chunk=config.epochs - done, priority=priority,
                   queue="train", kind="train", name=name or f"train {config.name}")
    farm.store.create(spec, unsent=False)  # its one task is sent here
    enqueue_training(farm.app, farm.settings, spec)
    log.info("job %s: training %s (%s), epochs %d-%d", spec.id, config.name, config.template, done + 1, config.epochs)
    return spec


def enqueue_training(app: Any, settings: Any, spec: JobSpec) -> int:
    """Send the job's one training task (also how `mlfarm retry` resumes a failed or cancelled run)."""
    kwargs = {"job_id": spec.id}
    app.send_task(TRAIN_TASK, kwargs=kwargs, kwargsrepr=repr({**kwargs, "run": spec.model}), queue="train",
                  priority=celery_priority(spec.priority), time_limit=settings.train_time_limit + TIME_LIMIT_GRACE)
    return 1
