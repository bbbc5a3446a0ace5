"""A window model for tests: each output frame is the mean of input frames f-1, f and f+1.

Where a neighbour is not on disk the runner repeats the nearest frame that is (clamped), so the
expected pixels at a shot's ends are exact: (2 * first + second) / 3. The ``sources`` plane says
which frames were averaged (f-1, f, f+1 as read), so tests see the clamping and the context reads.
"""

import numpy as np

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Neighbour mean (tests)"
        self.temporal = "window"
        self.window = 1
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4, "sources": ("prev", "this", "next")}
        self.device = "cpu"
        self.batch_size = 2

    def infer_batch(self, batch):
        out = []
        for w in batch:
            images = [item[0] for item in w.items]
            mean = sum(images) / float(len(images))
            h, wd = mean.shape[:2]
            sources = np.broadcast_to(np.asarray(w.frames, np.float32), (h, wd, 3)).copy()
            out.append([mean.astype(np.float32), sources])
        return out
