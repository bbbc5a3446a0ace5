"""sRGB transfer functions, on numpy arrays or torch tensors alike.

Sign-preserving, and unclamped above 1, so scene-linear plates with negative or HDR values
round-trip instead of turning into NaN or clipping.
"""

from __future__ import annotations

from typing import Any

_A = 0.055


def linear_to_srgb(x: Any, xp: Any) -> Any:
    """``xp`` is numpy or torch: both have abs, sign, where and pow with these names."""
    ax = xp.abs(x)
    encoded = xp.where(ax <= 0.0031308, ax * 12.92, (1 + _A) * ax ** (1 / 2.4) - _A)
    return xp.sign(x) * encoded


def srgb_to_linear(x: Any, xp: Any) -> Any:
    ax = xp.abs(x)
    decoded = xp.where(ax <= 0.04045, ax / 12.92, ((ax + _A) / (1 + _A)) ** 2.4)
    return xp.sign(x) * decoded
