"""What the CPU and GPU EXR writers share: the one error type, header values, failure messages.

Its own module so the GPU writer (gpu.py) and the CPU one (io.py) need not import each other.
"""

from __future__ import annotations

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
