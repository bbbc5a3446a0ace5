"""Checkpoints: a run's weights and optimiser state in one safetensors file per step.

safetensors, not ``torch.save``: a checkpoint written by one farm process is read by others (the
trainer resuming on another host, every worker using the model), and safetensors holds only
tensors and a JSON header, so reading one can never execute code, unlike a pickle. The optimiser's
per-parameter tensors are stored flat beside the weights; its hyperparameters and the run's
configuration go in the header. Files appear atomically (temporary file, then rename), so a killed
trainer leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mlfarm.storage import atomic_output

from .runs import CHECKPOINT_DIR, TrainConfig, checkpoint_name, list_checkpoints

log = logging.getLogger(__name__)

FORMAT = "mlfarm-train-1"
_MODEL, _OPTIM = "model.", "optim."


@dataclass
class Checkpoint:
    step: int
    config: TrainConfig
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None  # a torch optimiser state_dict, or None for weights only


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        index, key = name[len(_OPTIM):].split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(folder: Path, root: str | os.PathLike[str], step: int, config: TrainConfig, net: nn.Module,
                    optimizer: torch.optim.Optimizer | None) -> Path:
    tensors = {_MODEL + k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    metadata = {"format": FORMAT, "step": str(step), "config": json.dumps(config.to_dict(), sort_keys=True)}
    if optimizer is not None:
        optim_tensors, plain = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
        metadata["optimizer"] = json.dumps(plain, sort_keys=True)
    data = safetensors_bytes(tensors, metadata=metadata)
    path = folder / CHECKPOINT_DIR / checkpoint_name(step)
    with atomic_output(path, root) as tmp:
        tmp.write_bytes(data)
    return path


def load_checkpoint(path: Path, device: str = "cpu", with_optimizer: bool = True) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"not an mlfarm training checkpoint (format {meta.get('format')!r})")
            weights, optim = {}, {}
            for key in f.keys():
                if key.startswith(_MODEL):
                    weights[key[len(_MODEL):]] = f.get_tensor(key)
                elif with_optimizer and key.startswith(_OPTIM):
                    optim[key] = f.get_tensor(key)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a damaged file names itself
        raise ValueError(f"{path}: unreadable checkpoint: {exc}") from None
    optimizer = None
    if with_optimizer and "optimizer" in meta:
        optimizer = _unflatten_optimizer(optim, json.loads(meta["optimizer"]))
    return Checkpoint(int(meta["step"]), TrainConfig.from_dict(json.loads(meta["config"])), weights, optimizer)


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns what went."""
    old = list_checkpoints(folder)[:-keep] if keep > 0 else []
    removed = []
    for _, path in old:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed:
        log.info("%s: removed %d old checkpoint(s)", folder.name, len(removed))
    return removed
