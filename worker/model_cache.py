"""Loaded models, kept warm per worker process in a small LRU cache."""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections import OrderedDict

from mlfarm.exr.common import wanted
from mlfarm.models.base import BaseModel
from mlfarm.models.catalog import Catalog
from mlfarm.models.context import LoadContext
from mlfarm.settings import Settings

from . import sizing
from .gpu import torch_device

log = logging.getLogger(__name__)


class ModelCache:
    """Each model is created and ``load()``-ed once per process, on first use.

    Loading happens under a lock so two threads asking for a cold model load it once. The least
    recently used model is unloaded when more than ``size`` are warm.
    """

    def __init__(self, catalog: Catalog, size: int, device_policy: str = "auto", settings: Settings | None = None):
        self.catalog = catalog
        self.size = size
        self.device_policy = device_policy
        self.settings = settings  # what each model's load context carries; None: this process's
        self._models: OrderedDict[str, BaseModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> BaseModel:
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                self._models.move_to_end(name)
                return model
            model = self.catalog.entry(name).create()
            device = torch_device(model.device, self.device_policy)
            log.info("loading model %s on %s", name, device)
            context = LoadContext.for_model(model, device, self.settings)
            exr = context.settings
            if not context.outputs_on_device and wanted(exr.exr_compression, exr.exr_gpu_compress, device):
                log.info("outputs are compressed on the CPU: nvCOMP is not installed (pip install 'mlfarm[gpu]')")
            sizing.apply_torch()  # torch's pools at the process's plan, before and after torch is imported
            model.setup(context)
            sizing.apply_torch()
            self._models[name] = model
            while len(self._models) > self.size:
                old_name, old = self._models.popitem(last=False)
                log.info("unloading model %s", old_name)
                old.unload()
                del old
                self._free_gpu_memory()
            return model

    def warm(self) -> list[str]:
        return list(self._models)

    @staticmethod
    def _free_gpu_memory() -> None:
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
