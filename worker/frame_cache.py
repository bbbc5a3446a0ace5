"""The frame cache: a frame whose exact result is already on the storage is not rendered again.

Every output EXR carries its content key (``mlfarm/key`` in its header; ``mlfarm.content_keys``
says what the key covers). Before a worker renders a frame it computes the frame's key and looks:

1. at the frame's own output path: a file with that key, complete and readable, is the result;
2. in Redis, where each key points to the last file written (or found) with it, with that file's
   size and digest: a file elsewhere (another job, another output folder) is hard-linked (or, across
   file systems, copied) into place, atomically, like any output.

Either way the frame is recorded ``done`` and ``cached``. A file is trusted only when its bytes
still match (size and digest from the index, or read through in full when the index has no entry
for it): a truncated, rewritten or deleted file is a miss and the frame renders. Training and
MLClient frames never come here; a job submitted with ``force`` renders every frame but still
records its outputs' keys, so later jobs can find them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import OpenImageIO as oiio
import redis

from mlfarm.content_keys import WEIGHTS, digest, file_digest, frame_key, job_base
from mlfarm.exr.io import read_image, sidecar_path
from mlfarm.keys import cache_key
from mlfarm.settings import Settings
from mlfarm.storage import atomic_output, confined_path

log = logging.getLogger(__name__)

#: The header attribute holding an output's content key.
KEY_ATTRIBUTE = "mlfarm/key"

HERE, COPIED = "here", "copied"


def header_key(path: str | os.PathLike[str]) -> str | None:
    """The content key in an EXR's header; None when the file has none or cannot be opened."""
    inp = oiio.ImageInput.open(str(path))
    if inp is None:
        oiio.geterror()  # clear it: OpenImageIO keeps a per-thread error otherwise reported later
        return None
    try:
        value = inp.spec().getattribute(KEY_ATTRIBUTE)
    finally:
        inp.close()
    return value if isinstance(value, str) and value else None


def input_digest(path: str) -> str | None:
    """The digest of an input frame's bytes; None when it cannot be read (the frame then renders,
    and fails with the reader's own message)."""
    try:
        return file_digest(path)
    except OSError:
        return None


@dataclass
class FrameCache:
    client: redis.Redis
    settings: Settings
    _bases: dict[tuple[Any, ...], str] = field(default_factory=dict)

    # --- keys ------------------------------------------------------------------------------------
    def base(self, spec: Any, model: Any, layout: Mapping[str, Any]) -> str:
        """What every frame of ``spec`` shares: model, version, weights' content, options, planes and
        how they are written. Weights are hashed once per file (by path, size and mtime)."""
        weights = WEIGHTS.of_files(model.weight_files(self.settings))
        s = self.settings
        written = {"planes": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in layout.items()},
                   "compression": s.exr_compression, "rgba_half": s.exr_rgba_half}
        return job_base(spec.model, str(model.version), weights, spec.options, written)

    @staticmethod
    def frame_key(base: str, digests: Sequence[str | None]) -> str | None:
        """A frame's key from the digests of the input frames it reads; None if one is unreadable."""
        if any(d is None for d in digests):
            return None
        return frame_key(base, [str(d) for d in digests])

    @staticmethod
    def chain(previous: str, digest_: str | None, prompts: Any) -> str:
        """A sequence frame's key: the frame before's key, this frame's input (None: unreadable,
        which the state goes past) and its prompts."""
        return digest([previous, digest_, prompts])

    @staticmethod
    def chain_start(base: str, direction: str, origin_digest: str | None, origin_prompts: Any) -> str:
        """Where a stream's chain of keys starts: what seeds it (the origin frame and its prompts)."""
        return digest([base, direction, origin_digest, origin_prompts])

    # --- finding -----------------------------------------------------------------------------------
    def find(self, key: str, target: str, sidecar: bool = False) -> str | None:
        """Put the result with ``key`` at ``target`` if the storage has it: ``HERE`` (already there),
        ``COPIED`` (linked or copied from elsewhere), or None (render it)."""
        entry = self._entry(key)
        if self._holds(target, key, entry):
            self._remember(key, target, entry)
            return HERE
        if entry is None or entry.get("path") == target:
            return None
        source = entry["path"]
        try:
            confined_path(source, self.settings.storage_root)
        except OSError:
            return None
        if not self._holds(source, key, entry):
            with contextlib.suppress(redis.RedisError):
                self.client.delete(cache_key(key))
            return None
        try:
            if sidecar and os.path.isfile(sidecar_path(source)):  # first: once the EXR appears, so is it
                self._place(sidecar_path(source), sidecar_path(target))
            self._place(source, target)
        except OSError as exc:
            log.warning("could not copy cached frame %s to %s (%s); rendering it", source, target, exc)
            return None
        self._remember(key, target, entry)
        return COPIED

    def _entry(self, key: str) -> dict[str, Any] | None:
        try:
            raw = self.client.get(cache_key(key))
        except redis.RedisError as exc:  # the cache must never fail a frame: render instead
            log.debug("frame cache lookup failed: %s", exc)
            return None
        return json.loads(raw) if raw else None

    def _holds(self, path: str, key: str, entry: dict[str, Any] | None) -> bool:
        """Whether ``path`` is a complete, unchanged file with ``key``."""
        try:
            size = os.stat(path).st_size
        except OSError:
            return False
        if entry is not None and entry.get("path") == path:
            # The bytes the index recorded for this file (header, key and pixels): same size and digest.
            try:
                return size == entry.get("size") and file_digest(path) == entry.get("digest")
            except OSError:
                return False
        if header_key(path) != key:
            return False
        try:  # no record of its bytes: it must read through to its last pixel
            read_image(path)
        except Exception:
            return False
        return True

    def _place(self, source: str, target: str) -> None:
        with atomic_output(target, self.settings.storage_root) as tmp:
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copyfile(source, tmp)

    def _remember(self, key: str, path: str, entry: dict[str, Any] | None) -> None:
        """Point ``key`` at ``path`` (kept findable for another ``cache_ttl``)."""
        try:
            if entry is not None and entry.get("path") == path:
                self.client.expire(cache_key(key), self.settings.cache_ttl)
            else:
                self.record(key, path)
        except (OSError, redis.RedisError) as exc:
            log.debug("could not record frame cache entry for %s: %s", path, exc)

    # --- after writing ---------------------------------------------------------------------------------
    def record(self, key: str, path: str) -> None:
        """``path`` now holds the result with ``key``: remember its size and digest."""
        st = os.stat(path)
        entry = {"path": path, "size": st.st_size, "digest": file_digest(path)}
        self.client.set(cache_key(key), json.dumps(entry, sort_keys=True), ex=self.settings.cache_ttl)


def digests(paths: Mapping[int, str], submit: Callable[..., Any]) -> dict[int, str | None]:
    """Input digests of several frames at once, on the I/O threads (``submit``: an executor's)."""
    futures = {f: submit(input_digest, p) for f, p in paths.items()}
    return {f: fut.result() for f, fut in futures.items()}

