"""Kept so scripts that import ``mlfarm.broker.frames`` (Nuke's among them) go on working.

Frame lists and path patterns live in ``mlfarm.frames``, the core every layer may import.
Python 3.7 grammar: Nuke's Python imports this.
"""

from mlfarm.frames import (  # noqa: F401
    PatternError,
    check_pattern,
    chunked,
    format_frames,
    frame_path,
    parse_frames,
    to_printf,
)
