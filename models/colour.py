"""sRGB transfer functions, on numpy arrays or torch tensors alike.

Sign-preserving, and unclamped above 1, so scene-linear plates with negative or HDR values
round-trip instead of turning into NaN or clipping.
"""

from __future__ import annotations

from typing import Any

_A = 0.055


def linear_to_srgb(x: Any, xp: Any) -> Any:
    """``xp`` is numpy or torch: both have abs, where, copysign and power with these names.

    Written for few temporaries: on a 1080p frame this is memory-bound, not arithmetic-bound.
    """
    ax = xp.abs(x)
    encoded = ax ** (1 / 2.4)
    encoded *= 1 + _A
    encoded -= _A
    return xp.copysign(xp.where(ax <= 0.0031308, ax * 12.92, encoded), x)


def srgb_to_linear(x: Any, xp: Any) -> Any:
    ax = xp.abs(x)
    decoded = ax + _A
    decoded /= 1 + _A
    decoded **= 2.4
    return xp.copysign(xp.where(ax <= 0.04045, ax / 12.92, decoded), x)
