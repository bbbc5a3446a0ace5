"""The two template networks: a multi-scale encoder-decoder and a small classifier CNN.

Both are fully convolutional, so they train on crops and run on whole frames of any size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 3  # scales of the encoder-decoder: full, 1/2, 1/4


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class EncoderDecoder(nn.Module):
    """A U-Net-style encoder-decoder predicting a residual added to its input.

    The last convolution starts at zero, so an untrained network is the identity: training can
    only move its output from "the input" towards the ground truth, and frames of any size work
    once padded to a multiple of 2^(LEVELS-1).
    """

    def __init__(self, channels: int = 3, features: int = 16):
        super().__init__()
        widths = [features * 2**i for i in range(LEVELS)]
        self.encoders = nn.ModuleList(_block(cin, cout) for cin, cout in zip([channels, *widths], widths))
        self.decoders = nn.ModuleList(_block(widths[i] + widths[i + 1], widths[i]) for i in range(LEVELS - 1))
        self.head = nn.Conv2d(widths[0], channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (LEVELS - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, enc in enumerate(self.encoders):
            h = enc(h if i == 0 else F.avg_pool2d(h, 2))
            skips.append(h)
        for i in reversed(range(LEVELS - 1)):
            # nearest, not bilinear: its backward pass is deterministic on CUDA too (seeded runs repeat)
            h = F.interpolate(h, size=skips[i].shape[-2:], mode="nearest")
            h = self.decoders[i](torch.cat([h, skips[i]], dim=1))
        return x + self.head(h)

    def run_frame(self, x: torch.Tensor) -> torch.Tensor:
        """A whole frame (N x C x H x W of any size): reflect-padded to the network's multiple, then cropped."""
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self(x)[..., :h, :w]


class SmallClassifier(nn.Module):
    """Four convolutions (three of them striding), global average pooling, one linear layer."""

    def __init__(self, n_classes: int, channels: int = 3, features: int = 16):
        super().__init__()
        f = features
        self.features = nn.Sequential(
            nn.Conv2d(channels, f, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(f, 2 * f, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * f, 4 * f, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(4 * f, 4 * f, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(4 * f, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def build_network(template: str, features: int, n_classes: int = 0) -> nn.Module:
    if template == "img2img":
        return EncoderDecoder(features=features)
    if template == "classify":
        return SmallClassifier(n_classes, features=features)
    raise ValueError(f"unknown template {template!r}")
