"""A test model that never returns on any frame brighter than ``threshold``: a model, driver or file
system stuck for good, which only the frame time limit (worker/watchdog.py) gets the worker out of."""

import threading

from mlfarm.models import BaseModel

_NEVER = threading.Event()


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Hangs on bright frames (tests)"
        self.threshold = 5.0
        self.options = ("threshold",)
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"

    def inference(self, image_list):
        if float(image_list[0].mean()) > self.threshold:
            _NEVER.wait()
        return [image_list[0]]
