"""Gaussian blur, as nuke-ML-server's example model did it: linear -> sRGB, blur, back to linear.

Runs in torch so a GPU worker blurs on the GPU and a batch of same-sized frames goes through
one convolution. The kernel is 2*kernel_size+1 wide with OpenCV's default sigma for that size
and reflected borders (OpenCV's BORDER_REFLECT_101), like the seed's cv2.GaussianBlur, but
without its round trip through 8 bits, which clipped HDR values. A last channel that is alpha
(2 or 4 channels) passes through untouched.
"""

from mlfarm.models import BaseModel
from mlfarm.models.colour import linear_to_srgb, srgb_to_linear


def gaussian_kernel_1d(size: int, torch):
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (k / k.sum()).to(torch.float32)


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "Gaussian Blur"
        self.version = "2"
        self.kernel_size = 5
        self.options = ("kernel_size",)
        self.option_ranges = {"kernel_size": (0, 200)}
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4}
        self.device = "gpu"
        self.batch_size = 4

    def load(self, device):
        import torch

        self.torch = torch
        self.torch_device = device

    def inference(self, image_list):
        return self.infer_batch([image_list])[0]

    def infer_batch(self, batch):
        torch = self.torch
        out = [None] * len(batch)
        groups = {}
        for i, image_list in enumerate(batch):
            groups.setdefault(image_list[0].shape, []).append(i)
        with torch.inference_mode():
            for idx in groups.values():
                stack = torch.stack([torch.from_numpy(batch[i][0]) for i in idx]).to(self.torch_device)
                blurred = self._blur(stack.permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1).cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = [blurred[j]]
        return out

    def _blur(self, x):
        """x: B x C x H x W, scene-linear."""
        torch = self.torch
        channels = x.shape[1]
        keep_alpha = channels in (2, 4)
        # Keep every tensor channels-last (the numpy NHWC layout): elementwise work on a strided
        # slice, and depthwise convolution on NCHW, are each several times slower on the CPU.
        cl = torch.channels_last
        colour = (x[:, :-1] if keep_alpha else x).contiguous(memory_format=cl)
        size = 2 * int(self.kernel_size) + 1
        if size > 1:
            c = colour.shape[1]
            k = gaussian_kernel_1d(size, torch).to(x.device)
            pad = size // 2
            mode = "reflect" if min(x.shape[2], x.shape[3]) > pad else "replicate"
            y = linear_to_srgb(colour, torch)
            y = torch.nn.functional.pad(y, (pad, pad, pad, pad), mode=mode).contiguous(memory_format=cl)
            y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, size).repeat(c, 1, 1, 1), groups=c)
            y = torch.nn.functional.conv2d(y, k.view(1, 1, size, 1).repeat(c, 1, 1, 1), groups=c)
            colour = srgb_to_linear(y, torch)
        if keep_alpha:
            colour = torch.cat([colour, x[:, -1:]], dim=1)
        return colour.contiguous(memory_format=cl)
