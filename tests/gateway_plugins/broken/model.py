"""Gateway test model that always fails in ``inference``: the error must reach the artist, and a
failed request must leave nothing behind (in Redis or on storage)."""

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Broken (gateway tests)"
        self.inputs = {"image": 3}
        self.outputs = {"rgb": 3}
        self.device = "cpu"

    def inference(self, image_list):
        raise ValueError("broken on purpose")
