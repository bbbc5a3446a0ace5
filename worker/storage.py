"""Keeping workers inside the storage root, and making output files appear atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


class StorageError(OSError):
    """An output path the worker will not write; the message says which and why."""


def confined_path(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """``path`` with every symlink resolved, refused unless it lies inside ``root``.

    Resolving first means ``..`` segments and symlinks that lead out are caught, not just
    paths that look outside.
    """
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise StorageError(f"{path}: outside the storage root {root}; workers only write under it")
    return real


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it into place only on success.

    A reader (Nuke, a Read node) either sees no file or the whole file, even if the worker is
    killed halfway through writing: the rename is atomic within one folder.
    """
    final = confined_path(path, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    final = confined_path(final, root)  # the folders now exist: check again with them resolved
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
