"""What a model plugin is told when the worker loads it (``BaseModel.setup``).

Everything a plugin needs from the farm comes through here, so the next plugin (SAM 2, depth,
flow) adds nothing to the core settings, the worker or the CLI: the device it runs on, whether
its output planes may stay on that device (the worker compresses them there), the farm's
settings (weights folder, EXR options) and the plugin's own settings group.
Python 3.7 grammar and no heavy imports at the top: Nuke's Python imports the plugin API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoadContext:
    device: str  # the torch device the worker chose for the model: "cuda", "cpu"
    #: True where the worker compresses output planes on the device (nvCOMP): planes may be returned
    #: as device tensors and only small results need come back to the host.
    outputs_on_device: bool
    settings: Any  # the farm's mlfarm.settings.Settings
    #: The plugin's own settings group (an instance of its ``settings_class``), or None if it has none.
    plugin_settings: Any = None

    @classmethod
    def for_model(cls, model: Any, device: str, settings: Any = None) -> LoadContext:
        """The context the worker gives ``model`` on ``device`` under ``settings`` (default: this
        process's); also what a plugin loaded by hand (a test, a benchmark) gets."""
        from mlfarm.exr.common import can_encode
        from mlfarm.settings import get_settings

        settings = settings if settings is not None else get_settings()
        declared = getattr(model, "settings_class", None)
        return cls(device=device,
                   outputs_on_device=can_encode(settings.exr_compression, settings.exr_gpu_compress, device),
                   settings=settings, plugin_settings=declared() if declared is not None else None)
