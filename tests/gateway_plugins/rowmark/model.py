"""Gateway test model: marks each row with its index, top row 0, so a flipped frame shows.

It also returns objects, including a constant ``PythonScript`` (never built from the request),
which the gateway must drop because this model is not on its allow-list.
"""

import numpy as np

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Row marker (gateway tests)"
        self.step = 1.0
        self.options = ("step",)
        self.inputs = {"image": 3}
        self.outputs = {"rgb": 3}
        self.device = "cpu"

    def inference(self, image_list):
        img = image_list[0]
        rows = np.arange(img.shape[0], dtype=np.float32)[:, None, None] * np.float32(self.step)
        return [img + rows, {"rows": int(img.shape[0]), "PythonScript": "print('rowmark')",
                             "detections": [{"label": "top", "score": 0.5}, {"label": "bottom", "score": 0.25}]}]
