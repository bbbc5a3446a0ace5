"""Pixels between the MLClient wire encoding and the arrays our models take.

On the wire an image is float32 little-endian, planar (all of channel 0, then channel 1, ...) with
rows bottom-up, because that is how Nuke's image planes are laid out. Models take and return
HxWxC float32 arrays with the top row first, as everywhere else in mlfarm. This module is numpy
only so that a worker can decode what the gateway relays without importing protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WIRE_DTYPE = np.dtype("<f4")


class ImageError(ValueError):
    """An image the request describes inconsistently; the message is shown to the artist."""


@dataclass(frozen=True)
class WireImage:
    """One image as it travels: its shape and its planar, bottom-up float32 bytes."""

    width: int
    height: int
    channels: int
    data: bytes | bytearray | memoryview

    @property
    def expected_bytes(self) -> int:
        return self.width * self.height * self.channels * WIRE_DTYPE.itemsize

    def check(self, what: str = "image") -> None:
        if self.width <= 0 or self.height <= 0 or self.channels <= 0:
            raise ImageError(f"{what} is {self.width}x{self.height} with {self.channels} channels; "
                             "width, height and channels must all be positive")
        if len(self.data) != self.expected_bytes:
            raise ImageError(f"{what} says {self.width}x{self.height}x{self.channels} float32 "
                             f"({self.expected_bytes} bytes) but carries {len(self.data)} bytes")

    def to_array(self) -> np.ndarray:
        """HxWxC float32, top row first (a new array the model may keep or modify)."""
        self.check()
        planar = np.frombuffer(self.data, dtype=WIRE_DTYPE).reshape(self.channels, self.height, self.width)
        return np.ascontiguousarray(planar[:, ::-1, :].transpose(1, 2, 0), dtype=np.float32)

    @classmethod
    def from_array(cls, array: np.ndarray) -> WireImage:
        """Encode a model's output (HxW or HxWxC, any real dtype) for the wire."""
        img = np.asarray(array)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0 or img.shape[2] == 0:
            raise ImageError(f"the model returned an image of shape {img.shape}; expected HxWxC")
        if not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)
                or img.dtype == np.bool_):
            raise ImageError(f"the model returned an image of dtype {img.dtype}; expected float32")
        height, width, channels = img.shape
        planar = np.ascontiguousarray(img[::-1, :, :].transpose(2, 0, 1), dtype=WIRE_DTYPE)
        return cls(width, height, channels, memoryview(planar).cast("B"))
