"""A frames model for the frame cache's tests: scales its input by ``gain`` and, with ``log``,
appends each frame it renders to that file (one line per frame, from any worker process), so a test
counts exactly which frames were rendered and which were taken from the cache. ``seconds``: a
pause per frame, for tests that act on a job while it runs (pause, limits, dependencies)."""

import numpy as np

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Tally (tests)"
        self.gain = 2.0
        self.log = ""
        self.seconds = 0.0  # a pause per frame, for tests that act on a job while it runs
        self.options = ("gain", "log", "seconds")
        self.option_ranges = {"gain": (0.0, 100.0), "seconds": (0.0, 30.0)}
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"
        self.batch_size = 2
        self.sidecar_json = True

    def infer_batch(self, batch):
        import time

        out = []
        for (image,) in batch:
            time.sleep(float(self.seconds))
            if self.log:
                with open(self.log, "a") as fh:
                    fh.write(f"{float(image[0, 0, 0]):.6f}\n")
            out.append([np.asarray(image, np.float32) * float(self.gain), {"gain": float(self.gain)}])
        return out
