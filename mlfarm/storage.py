"""Keeping workers inside the storage root, and making output files appear atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
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


HOST = socket.gethostname().replace("-", "_")
STALE_AFTER_S = 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_partials(folder: Path) -> int:
    """Remove temporaries that killed workers left in ``folder``; returns how many.

    They are hidden (dot-prefixed), so a Read node never sees them, but they waste space. One is
    stale if its writer was on this host and is dead, or if it is older than an hour.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and ".partial-" in entry.name):
            continue
        host, _, rest = entry.name.rpartition(".partial-")[2].partition("-")
        pid = rest.partition("-")[0]
        try:
            dead_here = host == HOST and pid.isdigit() and not _pid_alive(int(pid))
            if dead_here or time.time() - entry.stat().st_mtime > STALE_AFTER_S:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed


_swept: set[Path] = set()
_swept_lock = threading.Lock()


def sweep_once(folder: Path) -> None:
    """``remove_stale_partials`` the first time this process writes into ``folder``.

    Not on every chunk: listing a shot's folder per chunk costs more the longer the shot. A worker
    that died left its temporaries to the process that replaces it, which sweeps on its first write.
    """
    with _swept_lock:
        if folder in _swept:
            return
        if len(_swept) > 4096:
            _swept.clear()
        _swept.add(folder)
    remove_stale_partials(folder)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it into place only on success.

    A reader (Nuke, a Read node) either sees no file or the whole file, even if the worker is
    killed halfway through writing: the rename is atomic within one folder.
    """
    final = confined_path(path, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    final = confined_path(final, root)  # the folders now exist: check again with them resolved
    tmp = final.with_name(f".{final.name}.partial-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")
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
