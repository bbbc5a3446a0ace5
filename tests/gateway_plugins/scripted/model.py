"""Gateway test model on the allow-list: returns its input and a constant ``PythonScript``."""

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Scripted (gateway tests)"
        self.inputs = {"image": 3}
        self.outputs = {"rgb": 3}
        self.device = "cpu"

    def inference(self, image_list):
        return [image_list[0], {"PythonScript": "print('scripted')"}]
