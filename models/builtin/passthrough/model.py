"""Returns its input unchanged: the yardstick for the farm's own per-frame overhead."""

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Pass-through"
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"
        self.batch_size = 8

    def inference(self, image_list):
        return [image_list[0]]
