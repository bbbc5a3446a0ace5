"""The flow plugin's own settings group: MLFARM_FLOW_* variables, ``flow_*`` keys of mlfarm.toml."""

from __future__ import annotations

from pydantic import Field

from mlfarm.settings import PluginSettings


class FlowSettings(PluginSettings):
    flow_memory_fraction: float = Field(
        default=0.7, gt=0, le=0.95, description="Share of the GPU's free memory RAFT's batches of frame pairs may "
        "take: the batch size is measured from it at the first frame of each size, not fixed.")
    flow_max_batch: int = Field(default=16, ge=1, le=256, description="Most frame pairs in RAFT at once.")
