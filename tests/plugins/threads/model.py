"""A test model that reports, per frame, the thread counts torch runs with in the worker process
(worker/sizing.py sizes them), and the OpenEXR pool's size."""

import os

import OpenImageIO as oiio

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Thread counts probe (tests)"
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "cpu"

    def load(self, device):
        import torch

        self.torch = torch

    def inference(self, image_list):
        torch = self.torch
        image = torch.from_numpy(image_list[0].copy())
        return [(image * 1.0).numpy(), {
            "torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "exr_threads": oiio.get_int_attribute("exr_threads"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }]
