"""nvCOMP's working memory from pools this process keeps, instead of fresh CUDA allocations per call.

Why: each nvCOMP call from Python allocates working memory (device scratch, and pinned host tables
of chunk pointers and sizes) and frees it when the call's objects go. With nvCOMP's own allocators
that is ``cudaMalloc``/``cudaFree`` and ``cudaMallocHost``/``cudaFreeHost`` per frame, and the frees
wait for the whole GPU to finish what it was doing, the network's work and every other thread's
frames included. ``install`` hands nvCOMP memory from torch's caching allocator (device) and from a
pool of pinned buffers kept here (host), so a frame's decode or encode allocates nothing new once
the pools are warm and waits for nothing but its own stream.

Reuse is ordered by streams, as torch's own allocator does it: device memory goes back to torch's
pool of the stream it was taken on; a pinned buffer is handed out again only once the work queued on
its stream before it was let go has finished (an event per buffer), since nvCOMP copies from it
asynchronously. That stream is the allocating thread's current one: mlfarm makes every codec on
its thread's own stream and calls it with that stream current (``gpu.thread_stream``). The stream
object nvCOMP passes to the allocators is not read: the one the pinned allocator gets crashes when
asked its handle (nvCOMP 6.0, on an H100).
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

    ``make(nbytes)`` makes a new buffer (a pinned uint8 tensor), ``current()`` gives the stream nvCOMP
    works on, ``event(stream)`` an object recorded on it with ``query()`` telling whether the work
    before it finished.
    """

    make: Callable[[int], Any]
    current: Callable[[], Any]
    event: Callable[[Any], Any]
    _free: dict[int, list[tuple[Any, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    made: int = 0  # buffers made (not reused): the pool's misses
    lent: int = 0

    def take(self, nbytes: int, stream: Any = None) -> Borrowed:
        """A buffer of at least ``nbytes`` (``stream``: nvCOMP's, not read; see the module's docstring)."""
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
        on = self.current()  # now: the buffer may come back on another thread
        return Borrowed(int(buffer.data_ptr()), lambda: self._give_back(size, buffer, on))

    def _give_back(self, size: int, buffer: Any, on: Any) -> None:
        done = self.event(on)
        with self._lock:
            self._free.setdefault(size, []).append((buffer, done))


@dataclass
class DevicePool:
    """Device memory lent to nvCOMP from torch's caching allocator, in its pool of the current stream."""

    torch: Any
    lent: int = 0

    def take(self, nbytes: int, stream: Any = None) -> Borrowed:
        """``nbytes`` of device memory (``stream``: nvCOMP's, not read; see the module's docstring)."""
        self.lent += 1
        tensor = self.torch.empty(max(1, int(nbytes)), dtype=self.torch.uint8, device="cuda")
        holder = [tensor]
        return Borrowed(int(tensor.data_ptr()), holder.clear)


_pools: dict[str, Any] = {}


def stats() -> dict[str, int]:
    """Buffers lent to nvCOMP so far, and pinned buffers made fresh (empty before ``install``)."""
    pinned, device = _pools.get("pinned"), _pools.get("device")
    if pinned is None or device is None:
        return {}
    return {"device_lent": device.lent, "pinned_lent": pinned.lent, "pinned_made": pinned.made}


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

        def event(stream: Any) -> Any:
            done = torch.cuda.Event()
            done.record(stream)
            return done

        device = DevicePool(torch)
        pinned = PinnedPool(lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True), torch.cuda.current_stream,
                            event)
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
