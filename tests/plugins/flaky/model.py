"""A pass-through whose worker is broken, for the bad-worker tests: with FLAKY_BROKEN=infer in the
worker's environment every frame raises a CUDA-looking error, with FLAKY_BROKEN=load the model does
not load; other workers render it. ``seconds``: time each frame takes where it works."""

import os
import time

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Broken on some workers (tests)"
        self.seconds = 0.0
        self.options = ("seconds",)
        self.option_ranges = {"seconds": (0.0, 30.0)}
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"

    def load(self, device):
        super().load(device)
        if os.environ.get("FLAKY_BROKEN") == "load":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device (tests)")

    def inference(self, image_list):
        if os.environ.get("FLAKY_BROKEN") == "infer":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (tests)")
        time.sleep(float(self.seconds))
        return [image_list[0]]
