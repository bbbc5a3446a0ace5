"""Interactive frames as files on shared storage (``MLFARM_GATEWAY_TRANSPORT=storage``).

Through Redis a frame crosses the one single-threaded server four times (gateway in, worker
out, worker in, gateway out). Through storage the gateway writes the request's pixels once, the
worker maps them, writes its result once, and the gateway sends that file's pages to the artist:
only the small header and the signals cross Redis. Every host of the farm already mounts the
storage root (frames are read and written there), so no new service is needed.

Layout: ``<storage root>/.mlfarm-gateway/<request id>.in`` and ``.out``, each the planar float32
bytes of its images one after another (their shapes travel in the Redis header). The folder is
hidden, so no Read node or sequence listing trips over it. A file is written under a hidden
temporary name and renamed, so a reader sees the whole file or none. There is no fsync: a file
lives for a second and need not survive a power cut, and NFS's close-to-open consistency already
makes a closed file whole for any host that opens it afterwards.

Cleanup: the gateway removes both files when the request ends, whatever the outcome; a worker
that finishes after the gateway gave up removes its own result (see ``Relay.put_reply``). Files
left by a process that was killed are removed by the next sweep of a gateway (at start and every
minute) once they are older than any request can live.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from mlfarm.storage import StorageError, confined_path

from .images import WireImage

log = logging.getLogger(__name__)

FOLDER = ".mlfarm-gateway"
#: Request ids are uuid4 hex: checked before they become file names, since anyone who can write
#: to Redis can put a task on the interactive queue.
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


class SpoolError(OSError):
    """A frame file that cannot be written or read; the message is shown to the artist."""


class Spool:
    """The spool folder under one process's storage root (workers resolve it with their own)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.folder = self.root / FOLDER

    def path(self, request_id: str, part: str) -> Path:
        if not _REQUEST_ID.fullmatch(request_id) or part not in ("in", "out"):
            raise SpoolError(f"refused a spool file name for request {request_id!r} ({part!r})")
        try:
            return confined_path(self.folder / f"{request_id}.{part}", self.root)
        except StorageError as exc:  # the spool folder is a symlink that leads out
            raise SpoolError(str(exc)) from None

    def write(self, request_id: str, part: str, images: Sequence[WireImage]) -> None:
        final = self.path(request_id, part)
        tmp = final.with_name(f".{final.name}.partial-{secrets.token_hex(4)}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                for img in images:
                    f.write(img.data)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SpoolError(f"cannot write the frame file {final}: {exc.strerror or exc}") from None

    def read(self, request_id: str, part: str, shapes: Sequence[Sequence[int]]) -> list[WireImage]:
        """The images, as views of the file mapped into memory (no copy until someone reads them;
        the map closes when the last view is gone). The file may be removed meanwhile."""
        path = self.path(request_id, part)
        expected = [int(w) * int(h) * int(c) * 4 for w, h, c, *_ in shapes]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SpoolError(f"the frame file {path} does not exist here: with MLFARM_GATEWAY_TRANSPORT=storage "
                             "the gateway and every worker must see the same storage at their "
                             f"MLFARM_STORAGE_ROOT (this process: {self.root})") from None
        except OSError as exc:
            raise SpoolError(f"cannot open the frame file {path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size != sum(expected):
                raise SpoolError(f"the frame file {path} holds {size} bytes; its header says {sum(expected)}")
            if size == 0:
                return []
            view = memoryview(mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ))
        finally:
            os.close(fd)
        images, offset = [], 0
        for (width, height, channels, *_), length in zip(shapes, expected):
            images.append(WireImage(int(width), int(height), int(channels), view[offset:offset + length]))
            offset += length
        return images

    def remove(self, request_id: str, parts: Sequence[str] = ("in", "out")) -> None:
        for part in parts:
            with contextlib.suppress(OSError):
                os.unlink(self.path(request_id, part))

    def sweep(self, older_than: float) -> int:
        """Remove files (and temporaries) not touched for ``older_than`` seconds; returns how many."""
        removed, cutoff = 0, time.time() - older_than
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        if removed:
            log.info("removed %d stale frame files from %s", removed, self.folder)
        return removed


#: Fault every page in at once: one kernel call instead of one fault per 4 KiB page of the frame.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
