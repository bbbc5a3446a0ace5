"""Replaying a model's fixed-shape steps as CUDA graphs, one per thread and input shape.

Why: on a GPU worker every eager tensor operation releases the GIL and must take it back, and
with the I/O threads of the same process wanting it too, most of the time of the thread feeding
the GPU went to waiting for it (profiled on an H100: a Mask R-CNN lane thread spent about 80% of
its samples waiting for the GIL, half of its operations in the backbone). A captured graph is
replayed with one call, however many kernels it holds.

A graph replays exactly what was captured: the same kernels on the same memory. So the wrapped
function must take one tensor of a fixed shape, give back tensors (in any nesting) whose shapes
depend only on that input's shape and on the ``config`` key the caller passes, and not sync with
the host. Its outputs are the graph's own buffers, overwritten by the next replay on the same
thread: a caller uses them before it replays again, in the order of its own stream (which the
worker's lanes do, each thread with its own graphs and stream).

Everything off CUDA, and any capture that fails, runs the function eagerly as before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Graph captures, one at a time in the process: captures on two threads at once may each see the
# other's work as illegal, and the first batches of a shape are rare.
_capture_lock = threading.Lock()


@dataclass
class _Entry:
    seen: int = 0  # eager calls so far; capture comes after ``warm_calls``
    graph: Any = None
    static_in: Any = None
    static_out: Any = None
    failed: bool = False


@dataclass
class GraphedFunction:
    """``fn`` of one tensor, replayed as CUDA graphs.

    ``warm_calls`` eager calls of a shape come first (cuDNN's autotuning and lazy allocations
    happen there, not inside a capture); ``per_thread`` bounds the shapes a thread keeps graphs
    for, since each graph holds its activations' memory for good.
    """

    fn: Callable[[Any], Any]
    enabled: bool = True  # False: always eager (MLFARM_MRCNN_CUDA_GRAPHS=false, to compare or to rule out)
    warm_calls: int = 1
    per_thread: int = 2
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __call__(self, x: Any, config: Hashable = ()) -> Any:
        if not (self.enabled and x.is_cuda):
            return self.fn(x)
        entries: OrderedDict[Hashable, _Entry] | None = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = OrderedDict()
        key = (tuple(x.shape), x.dtype, x.device, config)
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Entry()
            self._evict(entries)
        entries.move_to_end(key)
        if entry.graph is None:
            if entry.failed or entry.seen < self.warm_calls:
                entry.seen += 1
                return self.fn(x)
            if not self._capture(entry, x):
                return self.fn(x)
        entry.static_in.copy_(x)
        entry.graph.replay()
        return entry.static_out

    @property
    def graphs(self) -> int:
        """Graphs this thread holds (for tests and logs)."""
        entries = getattr(self._local, "entries", None) or {}
        return sum(1 for e in entries.values() if e.graph is not None)

    def _evict(self, entries: OrderedDict[Hashable, _Entry]) -> None:
        import torch

        while len(entries) > self.per_thread:
            _, old = entries.popitem(last=False)
            if old.graph is not None:
                # Its last replay may still be running on this thread's stream: let it finish
                # before the graph's memory goes back to the allocator.
                torch.cuda.current_stream().synchronize()

    def _capture(self, entry: _Entry, x: Any) -> bool:
        """Capture ``fn`` on ``x``'s shape, on a side stream of this thread; False where it fails."""
        import torch

        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(x.device)
        current = torch.cuda.current_stream(x.device)
        before = torch.cuda.memory_reserved(x.device)
        with _capture_lock:
            graph = torch.cuda.CUDAGraph()
            try:
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    static_in = x.clone()
                    self.fn(static_in)  # a warm run on the capture stream (per-stream workspaces)
                    # thread_local: the other threads' work (lanes, I/O) goes on while this one captures
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        static_out = self.fn(static_in)
                    finally:
                        graph.capture_end()
                current.wait_stream(stream)
            except Exception as exc:
                log.warning("CUDA graph capture failed for input %s (%s): running eagerly", tuple(x.shape), exc)
                entry.failed = True
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(x.device)
                _recover(stream)
                return False
        entry.graph, entry.static_in, entry.static_out = graph, static_in, static_out
        reserved = torch.cuda.memory_reserved(x.device)
        log.info("captured a CUDA graph for input %s: GPU memory reserved %.1f GiB (%+.1f GiB)", tuple(x.shape),
                 reserved / 2**30, (reserved - before) / 2**30)
        return True


def _recover(stream: Any) -> None:
    """Undo what a failed capture leaves behind in torch: its CUDA random generator still thinks
    a capture is running (torch 2.11: "Offset increment outside graph capture encountered
    unexpectedly" on the next ``torch.rand``), since only a capture that ends well ends that.
    So one that ends well, of a trivial graph, on the same stream."""
    import torch

    try:
        with torch.cuda.stream(stream):
            scratch = torch.zeros(1, device=stream.device)
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                scratch.add_(1)
            finally:
                graph.capture_end()
        del graph
    except Exception as exc:  # pragma: no cover - reported, not raised: eager inference does not need it
        log.warning("after a failed CUDA graph capture, torch's CUDA random numbers may not work in this "
                    "process (%s)", exc)
