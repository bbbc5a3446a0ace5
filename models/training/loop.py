"""The training loop shared by both templates: seeded, checkpointed, resumable at any step.

The loop knows nothing of the farm. Whoever runs it (the farm's ``mlfarm.train`` task, or a test)
passes :class:`Hooks` to hear about progress and to ask it to stop; on a stop request it writes a
checkpoint first, so nothing trained is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_checkpoint, prune_checkpoints, save_checkpoint
from .data import Crop, DataSet, centre_crop, epoch_batches, load_rgb, scan, steps_per_epoch
from .hooks import Hooks, Progress, Stopped
from .logs import TrainLog
from .networks import build_network
from .runs import RunError, TrainConfig, newest_checkpoint, prepare_run_dir, read_config, write_config

log = logging.getLogger(__name__)


@contextlib.contextmanager
def deterministic(device: str) -> Iterator[None]:
    """Deterministic kernels while training, restored afterwards (a worker also serves other jobs)."""
    before = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark = benchmark


class Images:
    """A split's pixels in memory (C x H x W float32 tensors), cut into batches of crops."""

    def __init__(self, data: DataSet, split: str):
        samples = data.train if split == "train" else data.val
        self.inputs = [torch.from_numpy(load_rgb(s.image)) for s in samples]
        self.targets = [torch.from_numpy(load_rgb(s.target)) for s in samples] if data.template == "img2img" else []
        self.labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        self.sizes = [tuple(t.shape[-2:]) for t in self.inputs]

    def __len__(self) -> int:
        return len(self.inputs)

    def place(self, device: str) -> Images:
        """Keep the pixels on a GPU when they fit in half its free memory: crops are then cut there,
        with no host-to-device copy per step (same values, so the same training)."""
        if device.startswith("cuda"):
            import torch.cuda

            size = sum(t.numel() * t.element_size() for t in self.inputs + self.targets)
            if size < torch.cuda.mem_get_info(torch.device(device))[0] // 2:
                self.inputs = [t.to(device) for t in self.inputs]
                self.targets = [t.to(device) for t in self.targets]
                self.labels = self.labels.to(device)
            else:
                log.info("training images (%.1f GB) stay in host memory", size / 1e9)
        return self

    def batch(self, crops: list[Crop], crop: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        def cut(t: torch.Tensor, c: Crop) -> torch.Tensor:
            piece = t[:, c.y:c.y + crop, c.x:c.x + crop]
            return piece.flip(-1) if c.flip else piece

        x = torch.stack([cut(self.inputs[c.index], c) for c in crops]).to(device)
        if self.targets:
            y = torch.stack([cut(self.targets[c.index], c) for c in crops]).to(device)
        else:
            y = self.labels[[c.index for c in crops]].to(device)
        return x, y


def loss_fn(template: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(out, target) if template == "img2img" else F.cross_entropy(out, target)


class Trainer:
    def __init__(self, config: TrainConfig, storage_root: str | os.PathLike[str], device: str = "cpu",
                 checkpoint_interval: float = 600.0, keep_checkpoints: int = 5, hooks: Hooks | None = None):
        config.check()
        self.config = config
        self.root = Path(storage_root)
        self.device = device
        self.checkpoint_interval = checkpoint_interval
        self.keep = keep_checkpoints
        self.hooks = hooks or Hooks()

    def run(self) -> Progress:
        """Train to ``config.epochs``, resuming from the run's newest checkpoint if it has one."""
        cfg = self.config
        data = scan(cfg.data, cfg.template, cfg.crop)
        folder = prepare_run_dir(self.root, cfg.name)
        if (folder / "run.json").exists():
            stored = read_config(folder)
            if stored.classes and data.classes and stored.classes != data.classes:
                raise RunError(f"run {cfg.name} was trained on classes {', '.join(stored.classes)} but {cfg.data} "
                               f"now holds {', '.join(data.classes)}")
        cfg.classes = data.classes
        write_config(folder, self.root, cfg)
        try:
            with deterministic(self.device):
                return self._train(cfg, data, folder)
        finally:
            if self.device.startswith("cuda"):  # the worker goes on to serve models: hand the memory back
                torch.cuda.empty_cache()

    def _train(self, cfg: TrainConfig, data: DataSet, folder: Path) -> Progress:
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.template, cfg.features, len(cfg.classes)).to(self.device)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        step = 0
        newest = newest_checkpoint(folder)
        if newest is not None:
            ckpt = load_checkpoint(newest[1])
            if (ckpt.config.template, ckpt.config.features, ckpt.config.classes) != (
                    cfg.template, cfg.features, cfg.classes):
                raise RunError(f"{newest[1]}: written by a differently shaped network "
                               f"({ckpt.config.template}, {ckpt.config.features} features); use another --name")
            net.load_state_dict(ckpt.weights)
            if ckpt.optimizer is not None:
                optimizer.load_state_dict(ckpt.optimizer)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr
            step = ckpt.step
            log.info("run %s: resuming from step %d (%s)", cfg.name, step, newest[1].name)
        train = Images(data, "train").place(self.device)
        val = Images(data, "val").place(self.device) if data.val else None
        per_epoch = steps_per_epoch(len(train), cfg.batch, cfg.crops_per_image)
        progress = Progress(step=step, total_steps=per_epoch * cfg.epochs, epoch=min(cfg.epochs, step // per_epoch),
                            epochs=cfg.epochs)
        train_log = TrainLog(folder, self.root, step)
        self.hooks.resumed(progress)
        last_save, saved_step = time.monotonic(), step
        pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, time, loss still on the device)
        epoch_losses = [0.0, 0]  # sum, count
        last_flush = time.monotonic()

        def flush(with_validation: bool = False) -> None:
            """Log the buffered steps: one device sync per flush (about a second), not one per step."""
            nonlocal last_flush
            if pending:
                values = torch.stack([loss for *_, loss in pending]).tolist()
                for n, ((s, e, when, _), v) in enumerate(zip(pending, values)):
                    last = with_validation and n == len(pending) - 1
                    train_log.row(s, e, v, cfg.lr, when, *((progress.val_loss, progress.val_accuracy) if last else ()))
                train_log.flush()
                epoch_losses[0] += sum(values)
                epoch_losses[1] += len(values)
                progress.loss = epoch_losses[0] / epoch_losses[1]
                pending.clear()
            last_flush = time.monotonic()

        def checkpoint() -> None:
            nonlocal last_save, saved_step
            flush()
            if saved_step != step or newest_checkpoint(folder) is None:
                path = save_checkpoint(folder, self.root, step, cfg, net, optimizer)
                prune_checkpoints(folder, self.keep)
                progress.checkpoint = path.name
                saved_step = step
            last_save = time.monotonic()

        try:
            for epoch in range(step // per_epoch + 1, cfg.epochs + 1):
                progress.epoch = epoch
                if not self.hooks.epoch_starting(epoch):
                    raise Stopped("cancelled", progress)
                batches = epoch_batches(train.sizes, cfg.crop, cfg.batch, cfg.crops_per_image, cfg.seed, epoch)
                epoch_losses[:] = [0.0, 0]
                for i in range(step - (epoch - 1) * per_epoch, per_epoch):
                    net.train()
                    x, y = train.batch(batches[i], cfg.crop, self.device)
                    loss = loss_fn(cfg.template, net(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    pending.append((step, epoch, time.time(), loss.detach()))
                    progress.step = step
                    last_of_epoch = i == per_epoch - 1
                    if last_of_epoch:
                        if val is not None:
                            progress.val_loss, progress.val_accuracy = self._validate(net, val)
                        flush(with_validation=val is not None)
                    elif time.monotonic() - last_flush >= 1.0:
                        flush()
                    self.hooks.step_done(progress)
                    if last_of_epoch:
                        continue  # the epoch's own checkpoint follows
                    reason = self.hooks.stop_reason()
                    if reason:
                        checkpoint()
                        raise Stopped(reason, progress)
                    if time.monotonic() - last_save >= self.checkpoint_interval:
                        checkpoint()
                checkpoint()
                self.hooks.epoch_done(progress)
                reason = self.hooks.stop_reason()
                if reason and epoch < cfg.epochs:
                    raise Stopped(reason, progress)
        finally:
            train_log.close()
        return progress

    def _validate(self, net: nn.Module, val: Images) -> tuple[float, float | None]:
        """Mean loss (and, for classify, accuracy) over each validation image's centre crop."""
        cfg = self.config
        net.eval()
        crops = [Crop(i, *centre_crop(size, cfg.crop), False) for i, size in enumerate(val.sizes)]
        total, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(crops), cfg.batch):
                x, y = val.batch(crops[start:start + cfg.batch], cfg.crop, self.device)
                out = net(x)
                total += float(loss_fn(cfg.template, out, y)) * len(x)
                if cfg.template == "classify":
                    correct += int((out.argmax(1) == y).sum())
        accuracy = correct / len(crops) if cfg.template == "classify" else None
        return total / len(crops), accuracy
