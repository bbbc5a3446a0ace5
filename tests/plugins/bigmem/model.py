"""A pass-through that declares what it needs of a worker (``requires``), for the routing tests."""

from mlfarm.models import BaseModel


class Model(BaseModel):
    requires = ("gpu_memory_gb>=24",)

    def __init__(self):
        super().__init__()
        self.name = "Needs a big GPU (tests)"
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"

    def inference(self, image_list):
        return [image_list[0]]
