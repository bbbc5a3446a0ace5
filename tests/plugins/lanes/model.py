"""A test model that takes several batches at once (``lanes``) and records how many overlapped."""

import threading
import time

import numpy as np

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Lanes probe (tests)"
        self.seconds = 0.4
        self.lanes = 2
        self.options = ("seconds", "lanes")
        self.option_ranges = {"seconds": (0.0, 30.0), "lanes": (1, 8)}
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4, "overlap": ("n",)}
        self.device = "cpu"
        self._lock = threading.Lock()
        self._inside = 0
        self._local = threading.local()  # a serial per thread that ever ran a batch: shows new threads
        self._threads = 0

    def infer_batch(self, batch):
        with self._lock:
            self._inside += 1
            overlap = self._inside
            if not hasattr(self._local, "serial"):
                self._threads += 1
                self._local.serial = self._threads
        try:
            time.sleep(float(self.seconds))
            with self._lock:  # the most batches seen inside at once, from entry to exit
                overlap = max(overlap, self._inside)
        finally:
            with self._lock:
                self._inside -= 1
        out = []
        for (img,) in batch:
            plane = np.full(img.shape[:2], float(overlap), np.float32)
            out.append([img, plane, {"thread": f"{threading.current_thread().name}#{self._local.serial}",
                                     "seconds": float(self.seconds)}])
        return out
