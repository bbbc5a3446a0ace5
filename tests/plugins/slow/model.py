"""A test model that takes its time: lets tests kill a worker in the middle of a chunk."""

import time

from mlfarm.models import BaseModel, Choice


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Slow pass-through (tests)"
        self.seconds = 0.5
        self.gain = 1.0
        self.mode = Choice("copy", ("copy", "invert"))
        self.flag = False
        self.label = "x"
        self.options = ("seconds", "gain", "mode", "label")
        self.buttons = ("flag",)
        self.option_ranges = {"seconds": (0.0, 30.0)}
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4, "extra": ("id",)}
        self.device = "cpu"

    def inference(self, image_list):
        time.sleep(float(self.seconds))
        img = image_list[0] * float(self.gain)
        if self.mode.value == "invert":
            img = 1.0 - img
        return [img, img[:, :, :1] * 0 + 7.0, {"label": self.label}]
