"""A test model that takes its worker down (SIGKILL) on any frame brighter than ``threshold``:
the poison frame that must not take down worker after worker."""

import os
import signal

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Crashes on bright frames (tests)"
        self.threshold = 5.0
        self.options = ("threshold",)
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"

    def inference(self, image_list):
        if float(image_list[0].mean()) > self.threshold:
            os.kill(os.getpid(), signal.SIGKILL)
        return [image_list[0]]
