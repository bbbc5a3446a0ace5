"""Content keys: one digest of everything that decides an output frame's pixels.

A frame's key covers the model (name, version), the weights it loaded (a digest of each file's
bytes), its options as canonical JSON, the output layout and compression, and the *content* of every
input frame it reads, not the paths: a plate re-delivered under the same names with five frames fixed
changes the keys of those five frames only. For a stateful sequence (SAM 2) the keys chain: frame f's
key covers its own inputs and prompts and the key of the frame before it in its direction, so a
correction on frame 1040 of a shot tracked forward from 1001 changes the keys of 1040 onwards only.

xxHash's XXH3 (128-bit) hashes at memory speed: a 1080p EXR costs a few milliseconds to read and hash,
measured in ``benchmarks/bench_cache.py``. Keys are for finding identical work, not for security.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash

#: Part of every key: change it when the recipe below changes, so old outputs stop matching.
RECIPE = 1

_READ_CHUNK = 4 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """XXH3-128 of a file's bytes (hex)."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as fh:
        while True:
            block = fh.read(_READ_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    """XXH3-128 of a value's canonical JSON (hex)."""
    return xxhash.xxh3_128_hexdigest(canonical(value).encode())


class FileDigests:
    """Digests of files that rarely change (weights), computed once per file and reused while the
    file's path, size and modification time stay the same."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, tuple[int, int, str]] = {}

    def __call__(self, path: str | os.PathLike[str]) -> str:
        path = os.path.abspath(path)
        st = os.stat(path)
        with self._lock:
            known = self._known.get(path)
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        value = file_digest(path)
        with self._lock:
            self._known[path] = (st.st_size, st.st_mtime_ns, value)
        return value

    def of_files(self, paths: Iterable[str | os.PathLike[str]]) -> str:
        """One digest of several files (a weights folder), by name and content."""
        files = sorted(os.path.abspath(p) for p in paths)
        return digest([[os.path.basename(p), self(p)] for p in files])


#: The process's cache of weights digests.
WEIGHTS = FileDigests()


def job_base(model: str, version: str, weights: str, options: Mapping[str, Any], layout: Mapping[str, Any]) -> str:
    """What every frame of a job shares: the model, its weights, options and output layout."""
    return digest({"recipe": RECIPE, "model": model, "version": str(version), "weights": weights,
                   "options": dict(options), "layout": dict(layout)})


def frame_key(base: str, inputs: Sequence[str]) -> str:
    """The key of a frame computed from ``inputs`` (the digests of the input frames it reads, in
    order: one for a frame model, the window's frames for a window model)."""
    return digest([base, list(inputs)])


def sequence_keys(base: str, frames: Sequence[int], inputs: Mapping[int, str],
                  prompts: Mapping[int, Any] | None = None, start: str = "") -> dict[int, str]:
    """Chained keys for a sequence processed in the order of ``frames`` (one direction).

    Each frame's key covers its input digest, the prompts given on it (``prompts``: frame -> JSON
    value) and the previous frame's key (``start`` before the first): a change on one frame changes
    that frame's key and every key after it in this direction, none before.
    """
    prompts = prompts or {}
    keys: dict[int, str] = {}
    previous = digest([base, start])
    for f in frames:
        previous = digest([previous, inputs[f], prompts.get(f)])
        keys[f] = previous
    return keys
