"""nvCOMP's working memory from pools this process keeps, instead of fresh CUDA allocations per call.

Why: each nvCOMP call from Python allocates working memory (device scratch, and pinned host tables
of chunk pointers and sizes) and frees it when the call's objects go. With nvCOMP's own allocators
that is ``cudaMalloc``/``cudaFree`` and ``cudaMallocHost``/``cudaFreeHost`` per frame, and the frees
wait for the whole GPU to finish what it was doing, the network's work and every other thread's
frames included. ``install`` hands nvCOMP memory from torch's caching allocator (device) and from a
pool of pinned buffers kept here (host), so a frame's decode or encode allocates nothing new once
the pools are warm and waits for nothing but its own stream.

Reuse is ordered by streams, as torch's own allocator does it: device memory goes back to torch's
pool of the stream it was taken on (nvCOMP works on the stream it gave, the thread's own stream);
a pinned buffer is handed out again only once the work queued on its stream before it was let go
has finished (an event per buffer), since nvCOMP copies from it asynchronously.
"""

from __future__ import annotations

import atexit
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_installed = False
_forget: list[Callable[[], None]] = []  # drop codecs this process keeps (``on_exit``)


class Borrowed:
    """A buffer nvCOMP holds (it reads ``ptr``); given back when nvCOMP lets go of this object."""

    __slots__ = ("ptr", "_release")

    def __init__(self, ptr: int, release: Callable[[], None]):
        self.ptr = ptr
        self._release = release

    def __del__(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            try:
                release()
            except Exception:  # at interpreter exit torch may be gone: the memory goes with the process
                pass


def size_class(nbytes: int) -> int:
    """Buffers are kept in powers of two (at least 4 KiB), so a pool serves varying sizes."""
    return max(4096, 1 << max(0, int(nbytes) - 1).bit_length())


@dataclass
class PinnedPool:
    """Pinned host buffers lent to nvCOMP, reused once their stream's work is done.

    ``make(nbytes)`` makes a new buffer (a pinned uint8 tensor), ``streams(stream)`` the torch stream
    of nvCOMP's, ``event(stream)`` an object recorded on that torch stream with ``query()`` telling
    whether the work before it finished.
    """

    make: Callable[[int], Any]
    streams: Callable[[Any], Any]
    event: Callable[[Any], Any]
    _free: dict[int, list[tuple[Any, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    made: int = 0  # buffers made (not reused): the pool's misses
    lent: int = 0

    def take(self, nbytes: int, stream: Any) -> Borrowed:
        size = size_class(nbytes)
        buffer = None
        with self._lock:
            self.lent += 1
            waiting = self._free.get(size, [])
            for i, (candidate, done) in enumerate(waiting):
                if done.query():
                    buffer = candidate
                    del waiting[i]
                    break
            if buffer is None:
                self.made += 1
        if buffer is None:
            buffer = self.make(size)
        on = self.streams(stream)  # now: nvCOMP's stream object may be gone when the buffer comes back
        return Borrowed(int(buffer.data_ptr()), lambda: self._give_back(size, buffer, on))

    def _give_back(self, size: int, buffer: Any, on: Any) -> None:
        done = self.event(on)
        with self._lock:
            self._free.setdefault(size, []).append((buffer, done))


@dataclass
class DevicePool:
    """Device memory lent to nvCOMP from torch's caching allocator, on the stream nvCOMP gave."""

    torch: Any
    streams: Callable[[Any], Any]  # nvCOMP's stream -> the torch stream it is (``torch_stream``)
    lent: int = 0

    def take(self, nbytes: int, stream: Any) -> Borrowed:
        torch = self.torch
        self.lent += 1
        with torch.cuda.stream(self.streams(stream)):  # torch's pool of that stream
            tensor = torch.empty(max(1, int(nbytes)), dtype=torch.uint8, device="cuda")
        holder = [tensor]
        return Borrowed(int(tensor.data_ptr()), holder.clear)


_pools: dict[str, Any] = {}


def stats() -> dict[str, int]:
    """Buffers lent to nvCOMP so far, and pinned buffers made fresh (empty before ``install``)."""
    pinned, device = _pools.get("pinned"), _pools.get("device")
    if pinned is None or device is None:
        return {}
    return {"device_lent": device.lent, "pinned_lent": pinned.lent, "pinned_made": pinned.made}


def torch_stream(torch: Any, stream: Any) -> Any:
    """The torch stream nvCOMP works on: this thread's current one. mlfarm makes every codec on its
    thread's own stream and calls it with that stream current (``gpu.thread_stream``). nvCOMP's own
    stream object is not read: the one it passes to the pinned allocator crashes when asked its
    handle (nvCOMP 6.0, measured on an H100)."""
    return torch.cuda.current_stream()


def install(torch: Any) -> None:
    """Once per process, before the first nvCOMP codec works: nvCOMP's device and pinned memory from
    the pools above, unless ``Settings.exr_nvcomp_pools`` is off. Harmless to call again."""
    global _installed
    with _lock:
        if _installed:
            return
        from mlfarm.settings import get_settings

        if not get_settings().exr_nvcomp_pools:
            _installed = True  # asked once: nvCOMP keeps its own allocators (MLFARM_EXR_NVCOMP_POOLS=false)
            return
        from nvidia import nvcomp

        def streams(stream: Any) -> Any:
            return torch_stream(torch, stream)

        def event(stream: Any) -> Any:
            done = torch.cuda.Event()
            done.record(stream)
            return done

        device = DevicePool(torch, streams)
        pinned = PinnedPool(lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True), streams, event)
        nvcomp.set_device_allocator(device.take)
        nvcomp.set_pinned_allocator(pinned.take)
        _pools.update(device=device, pinned=pinned)
        _installed = True
        atexit.register(_uninstall)
        log.debug("nvCOMP's memory now comes from torch's caching allocator and a pinned pool")


def on_exit(forget: Callable[[], None]) -> None:
    """``forget`` drops codecs the caller keeps (they hold pooled memory) when the process ends (once,
    however often it is registered)."""
    with _lock:
        if forget not in _forget:
            _forget.append(forget)


def _uninstall() -> None:
    """At exit, while Python still runs: codecs dropped, their memory given back, and nvCOMP's own
    allocators restored. nvCOMP keeps the allocator callables in C++ statics; left in place, it
    releases them after the interpreter is gone and the process ends with a segmentation fault
    (measured on an H100 with nvCOMP 6.0: every process that had installed them)."""
    global _installed
    if not _pools:
        return
    for forget in _forget:
        forget()
    gc.collect()
    from nvidia import nvcomp

    nvcomp.set_device_allocator(None)
    nvcomp.set_pinned_allocator(None)
    _installed = False
