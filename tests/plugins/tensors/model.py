"""A test model whose output planes are torch tensors, as a GPU model's may be (here on the CPU):
the worker must write them as images, not take them for objects."""

import torch

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Tensor outputs (tests)"
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4, "mask": ("id",)}
        self.device = "cpu"

    def inference(self, image_list):
        img = torch.from_numpy(image_list[0].copy())
        ids = (img[:, :, 0] > 0.5).to(torch.int32) * 7  # an integer plane: written as float ids
        return [img * 2, ids.half(), {"pixels_over_half": int((ids > 0).sum())}]
