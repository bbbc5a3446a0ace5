"""What the CPU and GPU EXR writers share: the one error type, header values, failure messages,
and whether outputs can be compressed on the GPU.

Its own module so the GPU writer (gpu.py) and the CPU one (io.py) need not import each other, and
so a plugin's load context can ask about GPU compression without importing torch or numpy.
Python 3.7 grammar: the plugin API (which Nuke's Python imports) reaches it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any


class FrameError(Exception):
    """A frame that cannot be read or written; the message names the file and the cause."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line: it is shown in status tables and Nuke


def header_value(value: Any) -> int | float | str:
    """A metadata value as the EXR header stores it: int (32-bit), float or string; anything else
    (booleans, lists, dicts, huge ints) as JSON text, which Nuke shows and scripts can parse."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, int) and not -(1 << 31) <= value < (1 << 31):
        return json.dumps(value)
    return value


def write_failure(message: str, tmp: os.PathLike[str], nbytes: int) -> str:
    """OpenEXR's message loses errno; say what a wrangler needs: the disk is full, or read-only.

    The hidden temporary's name is no use to an artist, so it is left out.
    """
    message = message.replace(f'"{os.fspath(tmp)}"', "the output").replace(os.fspath(tmp), "the output")
    folder = os.path.dirname(os.fspath(tmp))
    try:
        st = os.statvfs(folder)
    except OSError:
        return message
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        return f"No space left on device ({free // 1024} KiB free in {folder}): {message}"
    if st.f_flag & os.ST_RDONLY:
        return f"Read-only file system ({folder}): {message}"
    return message


@functools.cache
def nvcomp_available() -> bool:
    """Whether nvCOMP's Python package (``nvidia-nvcomp-cu13``) is installed."""
    try:
        from nvidia import nvcomp  # noqa: F401
    except ImportError:
        return False
    return True


def wanted(compression: str, enabled: bool, device: str) -> bool:
    """Whether these settings ask for outputs made on ``device`` to be compressed there."""
    return enabled and compression == "zips" and str(device).startswith("cuda")


def can_decode(enabled: bool, device: str) -> bool:
    """Whether plates for a model on ``device`` can be decoded there, with this setting (``exr_gpu_decode``)."""
    return enabled and str(device).startswith("cuda") and nvcomp_available()


def can_encode(compression: str, enabled: bool, device: str) -> bool:
    """Whether outputs made on ``device`` can be compressed there, with these settings."""
    return wanted(compression, enabled, device) and nvcomp_available()
