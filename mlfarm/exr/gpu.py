"""ZIPS EXRs compressed on the GPU that made the planes, so a GPU worker's CPU cores stay free.

Why: with zip outputs a Mask R-CNN worker is CPU-bound, not GPU-bound. OpenEXR's zip encoder costs
about 0.2 core-seconds for eight half channels at 1080p, more than the network's GPU time
(README, Mask R-CNN speed). ZIPS (zip, one scanline a chunk; Nuke's own default for EXR) is the
zip variant that fits nvCOMP's batched deflate, which takes chunks of at most 64 KiB.

The file is the one OpenEXR writes: the same header attributes, and per scanline a zlib stream of
OpenEXR's byte split and delta predictor, or the raw line where compressing does not make it
smaller. OpenImageIO reads it back bit-exact (tests/test_gpu_exr.py).

Only the deflate is nvCOMP's. Everything else (line layout, predictor, Adler-32 sums, the chunks'
framing) is torch code that runs on whatever device holds the planes; for CPU tensors zlib does
the deflate, which is how the tests check the format on machines without a GPU. The CPU never
touches a pixel: it gets back the finished chunks in one copy, and writes them after a header
and an offset table.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlfarm.storage import atomic_output

from .common import FrameError, can_decode, can_encode, header_value, nvcomp_available, wanted, write_failure  # noqa: F401

HALF, FLOAT = 1, 2  # OpenEXR's pixel types
ZIPS = 2  # OpenEXR's compression code for zip, one scanline a chunk
# nvCOMP's deflate effort, 0 (fastest) to 5: ``Settings.exr_gpu_deflate_effort`` unless a benchmark sets
# it here. On H200, 2 ("medium") gave files a third smaller than 1 (8.2 against 10.7 MB for Mask
# R-CNN's 1080p planes; OpenEXR's own: 7.8) at the same speed or better (bench_gpu_zip.py --deflate-type 0,1,2).
DEFLATE_TYPE: int | None = None
MAX_LINE_BYTES = 65536  # nvCOMP's deflate takes chunks up to 64 KiB: wider lines go to the CPU writer
_ZLIB_HEADER = (0x78, 0x01)  # deflate, 32 KiB window, no preset dictionary (a valid check value)

_local = threading.local()


def thread_stream(torch: Any) -> Any:
    """This thread's own CUDA stream, made its current stream on first use.

    Each I/O thread draws and compresses its frames on its own stream, so frames compress side by
    side and never queue behind the network's stream. A model's ``postprocess`` that edits device
    planes calls this too, so its work and the compression run in order on one stream.
    """
    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream()
    torch.cuda.set_stream(stream)
    return stream


@contextlib.contextmanager
def finished_here(torch: Any, device: str) -> Iterator[None]:
    """On a CUDA ``device``: the block's work runs on this thread's own stream (``thread_stream``),
    and the block ends once that work is done (waiting without spinning or holding the GIL). How a
    plugin's ``preprocess`` makes a frame ready on an I/O thread for the lane that runs the network.
    Elsewhere: nothing."""
    if not str(device).startswith("cuda"):
        yield
        return
    stream = thread_stream(torch)
    yield
    done = torch.cuda.Event(blocking=True)
    done.record(stream)
    done.synchronize()


def mark_ready(outputs: Sequence[Any]) -> Any:
    """On the thread that made ``outputs`` (a lane): an event on its current stream, recorded after
    the work that makes them, where any output is a CUDA tensor; None otherwise.

    Why: a model returns device planes as soon as their work is queued, and the I/O thread that
    writes them runs on a stream of its own (``thread_stream``); without this its compression could
    read planes the network's stream has not finished.
    """
    from mlfarm.tensors import is_tensor

    cuda = next((o for o in outputs if is_tensor(o) and o.device.type == "cuda"), None)
    if cuda is None:
        return None
    import torch

    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(cuda.device))
    return ready


def take_over(outputs: Sequence[Any], ready: Any) -> None:
    """On the thread that writes ``outputs``: its stream waits for ``ready`` (``mark_ready``), and each
    CUDA output's memory stays theirs until this stream's work on it is done."""
    import torch

    from mlfarm.tensors import is_tensor

    stream = thread_stream(torch)
    stream.wait_event(ready)
    used_here([o for o in outputs if is_tensor(o) and o.device.type == "cuda"], stream)


def used_here(tensors: Sequence[Any], stream: Any = None) -> None:
    """CUDA tensors made on another thread's stream (``finished_here``, ``mark_ready``) and used on
    ``stream`` (default: this thread's current one): their memory is not handed out again before
    that stream's work on them is done."""
    if not tensors:
        return
    if stream is None:
        import torch

        stream = torch.cuda.current_stream(tensors[0].device)
    for t in tensors:
        t.record_stream(stream)


# --- the header --------------------------------------------------------------------------
def _attribute(name: str, kind: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value


def header_bytes(width: int, height: int, channels: Sequence[tuple[str, int]], metadata: Mapping[str, Any]) -> bytes:
    """A single-part scanline header with ZIPS compression, attributes sorted by name as OpenEXR
    sorts them; metadata values become int, float or string attributes as in io.write_exr."""
    box = struct.pack("<iiii", 0, 0, width - 1, height - 1)
    chlist = b"".join(n.encode() + b"\0" + struct.pack("<iB3xii", t, 0, 1, 1) for n, t in sorted(channels)) + b"\0"
    attrs = {"channels": ("chlist", chlist), "compression": ("compression", bytes([ZIPS])),
             "dataWindow": ("box2i", box), "displayWindow": ("box2i", box), "lineOrder": ("lineOrder", b"\0"),
             "pixelAspectRatio": ("float", struct.pack("<f", 1.0)),
             "screenWindowCenter": ("v2f", struct.pack("<ff", 0.0, 0.0)),
             "screenWindowWidth": ("float", struct.pack("<f", 1.0)), "type": ("string", b"scanlineimage")}
    for key, raw in metadata.items():
        value = header_value(raw)
        if isinstance(value, int):
            attrs[key] = ("int", struct.pack("<i", value))
        elif isinstance(value, float):
            attrs[key] = ("float", struct.pack("<f", value))
        else:
            attrs[key] = ("string", value.encode())
    long_names = any(len(k.encode()) > 31 for k in attrs)
    version = 2 | (0x400 if long_names else 0)
    return (struct.pack("<ii", 20000630, version)
            + b"".join(_attribute(k, kind, v) for k, (kind, v) in sorted(attrs.items())) + b"\0")


# --- the pixels, on their device ------------------------------------------------------------
def line_bytes(torch: Any, channels: Sequence[tuple[str, Any]]) -> Any:
    """H x L bytes: each scanline as OpenEXR lays it out, channels in name order, each channel's
    pixels in turn, little-endian (as every CUDA device and x86 host stores them).

    Channels of one type (the usual case: all half) are gathered in one operation. Why: on a GPU
    worker every tensor operation here hands the GIL to the threads feeding the network and waits
    to take it back, and a copy and two views per channel were 25 operations a frame.
    """
    ordered = [t for _, t in sorted(channels, key=lambda c: c[0])]
    if len({t.dtype for t in ordered}) == 1:
        return torch.stack(ordered, 1).view(torch.uint8).reshape(ordered[0].shape[0], -1)
    return torch.cat([t.contiguous().view(torch.uint8).reshape(t.shape[0], -1) for t in ordered], 1)


def predict(torch: Any, lines: Any) -> Any:
    """OpenEXR's zip preprocessing of each line: even bytes then odd bytes, then byte deltas + 128
    (uint8 arithmetic wraps around, as OpenEXR's does)."""
    split = torch.cat([lines[:, 0::2], lines[:, 1::2]], dim=1)
    out = split.clone()
    out[:, 1:] = split[:, 1:] - split[:, :-1] + 128
    return out


def adler32_lines(torch: Any, lines: Any) -> Any:
    """Adler-32 of every line, for the zlib trailer.

    Both sums of every line come from one float64 matrix product: each product and partial sum is
    an integer below 2**53 for lines up to 64 KiB, so it is exact whatever the summation order, and
    it reads the bytes once (int64 sums took five passes over an eight-fold copy).
    """
    n = lines.shape[1]
    sums = (lines.to(torch.float64) @ _adler_weights(torch, n, lines.device)).to(torch.int64)
    a = (1 + sums[:, 0]) % 65521
    s = (n + sums[:, 1]) % 65521
    return (s << 16) | a


@functools.lru_cache(maxsize=16)
def _adler_weights(torch: Any, n: int, device: Any) -> Any:
    """n x 2 float64: ones (the byte sum) and n..1 (the running sum's weights), made once per line
    length and device."""
    return torch.stack([torch.ones(n, dtype=torch.float64), torch.arange(n, 0, -1, dtype=torch.float64)],
                       1).to(device)


# --- deflate: nvCOMP on the GPU, zlib for CPU tensors ------------------------------------------
def _zlib_deflate(torch: Any, predicted: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """Raw deflate of each line with zlib: the reference for CPU tensors (and the tests)."""
    streams = []
    for row in predicted.numpy():
        deflate = zlib.compressobj(4, zlib.DEFLATED, -15)
        streams.append(deflate.compress(row.tobytes()) + deflate.flush())
    sizes = np.array([len(s) for s in streams], dtype=np.int64)
    stride = int(sizes.max())  # at a fixed stride, as nvCOMP's are
    packed = b"".join(s.ljust(stride, b"\0") for s in streams)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8), np.arange(len(streams)) * stride, sizes


@dataclass
class _Plan:
    """One frame size's device buffers and nvCOMP's views of them, made once per thread and reused.

    Why: nvCOMP's batch views allocate pinned host memory (cuMemHostAlloc) when made and free it
    (cuMemFreeHost, which waits on the GPU) when dropped, holding the GIL throughout. Made per
    frame, that was a third of the time the GIL was held on an H100 worker, stalling the thread
    that feeds the network. Costs about 70 MB of GPU memory per I/O thread at 1080p.
    """

    key: tuple[int, int, str]  # lines, bytes a line, device: what the buffers were made for
    predicted: Any  # H x padded bytes: each line to compress at an aligned offset
    out: Any  # deflate's output, one line every ``stride`` bytes
    offsets: np.ndarray
    src: Any
    dst: Any
    config: Any


class _NvcompDeflate:
    """One thread's nvCOMP deflate codec on that thread's stream, with the plan for its frame size."""

    def __init__(self, torch: Any, stream: Any):
        from nvidia import nvcomp

        from . import nvcomp_memory

        nvcomp_memory.install(torch)
        nvcomp_memory.on_exit(_forget_codec)
        self.nvcomp = nvcomp
        self.torch = torch
        self.stream = stream
        self.codec = nvcomp.Codec(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW,
                                  algorithm_type=deflate_effort(),
                                  uncomp_chunk_size=MAX_LINE_BYTES, cuda_stream=stream.cuda_stream)
        self.align = max(16, int(self.codec.get_required_compression_alignment()))
        self.current: _Plan | None = None

    def plan(self, height: int, length: int, device: Any) -> _Plan:
        """The buffers for ``height`` lines of ``length`` bytes: kept while frames keep that size."""
        key = (height, length, str(device))
        if self.current is None or self.current.key != key:
            torch, nvcomp, stream = self.torch, self.nvcomp, self.stream.cuda_stream
            self.current = None  # the old buffers go before the new ones are made
            padded = -(-length // self.align) * self.align
            predicted = torch.empty(height, padded, dtype=torch.uint8, device=device)
            bound = int(self.codec.get_max_comp_buffer_size(nvcomp.as_array(predicted[0, :length])))
            stride = -(-bound // self.align) * self.align
            out = torch.empty(height * stride, dtype=torch.uint8, device=device)
            offsets = np.arange(height, dtype=np.int64) * stride
            src = nvcomp.as_arrays(predicted.view(-1), list(range(0, height * padded, padded)), [length] * height,
                                   stream)
            dst = nvcomp.as_arrays(out, offsets.tolist(), [stride] * height, stream)
            self.current = _Plan(key, predicted, out, offsets, src, dst,
                                 self.codec.compression_config([length] * height))
        return self.current

    def __call__(self, plan: _Plan) -> tuple[Any, np.ndarray, np.ndarray]:
        """Deflate ``plan.predicted`` (filled on this thread's stream) into ``plan.out``."""
        encoded = self.codec.encode(plan.src, out=plan.dst, compression_config=plan.config)
        done = self.torch.cuda.Event(blocking=True)  # wait without holding the GIL, then read the sizes
        done.record(self.stream)
        done.synchronize()
        sizes = np.asarray(encoded.buffer_sizes, dtype=np.int64)
        return plan.out, plan.offsets, sizes


def deflate_effort() -> int:
    """The deflate effort new codecs use: ``DEFLATE_TYPE`` where set, else the settings'."""
    if DEFLATE_TYPE is not None:
        return DEFLATE_TYPE
    from mlfarm.settings import get_settings

    return get_settings().exr_gpu_deflate_effort


def _nvcomp_deflate(torch: Any) -> _NvcompDeflate:
    stream = thread_stream(torch)
    codec = getattr(_local, "deflate", None)
    if codec is None or codec.stream is not stream:
        codec = _local.deflate = _NvcompDeflate(torch, stream)
    return codec


# --- the chunks ------------------------------------------------------------------------------
def chunks(torch: Any, raw: Any, compressed: Any, offsets: np.ndarray, sizes: np.ndarray, adler: Any
           ) -> tuple[Any, np.ndarray]:
    """Every scanline's chunk, back to back, built on the device: (y, data size, data) where data is
    a zlib stream (header, deflate, Adler-32) or, where that is not smaller than the line, the raw
    line as OpenEXR stores it. Returns the bytes and each chunk's size.

    Each chunk is laid out in its own row of one buffer, then the rows' used bytes are packed with
    one masked select: a few passes over the frame's bytes, whatever the number of lines.
    """
    height, length = raw.shape
    device = raw.device
    packed = sizes + 6 < length
    data_size = np.where(packed, sizes + 6, length)
    chunk = data_size + 8
    width = int(max(sizes.max() + 14, length + 8))
    rows = torch.empty(height, width, dtype=torch.uint8, device=device)
    # y and size (little-endian) and zlib's header: 10 bytes a line, from the host.
    head = np.empty((height, 10), np.uint8)
    head[:, 0:4] = np.arange(height, dtype="<i4").view(np.uint8).reshape(height, 4)
    head[:, 4:8] = data_size.astype("<i4").view(np.uint8).reshape(height, 4)
    head[:, 8:10] = _ZLIB_HEADER
    rows[:, :10] = torch.from_numpy(head).to(device)
    # Deflate's output sits at a fixed stride in ``compressed``: one strided copy moves it behind the heads.
    stride = int(offsets[1] - offsets[0]) if height > 1 else int(sizes[0])
    if not (offsets == np.arange(height) * stride).all():
        raise ValueError("compressed lines must lie at a fixed stride")
    span = min(stride, width - 10)
    rows[:, 10:10 + span] = compressed[: height * stride].view(height, stride)[:, :span]
    # Adler-32, big-endian, right after each line's deflate stream.
    # (int32 wraps values of 2**31 and over to the same four bytes.)
    trailer = adler.to(torch.int32).view(torch.uint8).view(height, 4).flip(1)
    at = torch.from_numpy(sizes + 10).to(device)[:, None] + torch.arange(4, device=device)
    rows.scatter_(1, at, trailer)
    stored = np.flatnonzero(~packed)
    if len(stored):
        index = torch.from_numpy(stored).to(device)
        rows[index, 8:8 + length] = raw[index]
    used = torch.arange(width, device=device)[None, :] < torch.from_numpy(chunk).to(device)[:, None]
    return torch.masked_select(rows, used), chunk


def write_zips(path: str, root: str | os.PathLike[str], channels: Sequence[tuple[str, Any]],
               metadata: Mapping[str, Any]) -> None:
    """Write H x W channel tensors (half or float32, one device) as a ZIPS EXR, atomically under the
    storage root. On a CUDA device the work runs on the calling thread's stream (``thread_stream``),
    after whatever the thread queued there before (e.g. labels its model pasted into the planes)."""
    import torch

    first = channels[0][1]
    height, width = first.shape
    types = [(name, HALF if t.dtype == torch.float16 else FLOAT) for name, t in channels]
    for name, t in channels:
        if t.shape != first.shape or t.device != first.device or t.dtype not in (torch.float16, torch.float32):
            raise FrameError(f"{path}: channel {name} is {tuple(t.shape)} {t.dtype} on {t.device}; every channel "
                             f"must be {height}x{width} half or float on {first.device}")
    with torch.inference_mode():  # planes a model made in inference mode; nothing here needs autograd
        header, table, payload = _encode(torch, path, channels, types, metadata)
    with atomic_output(path, root) as tmp:
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(table.tobytes())
                f.write(memoryview(payload.numpy()))
        except OSError as exc:
            nbytes = len(header) + table.nbytes + payload.numel()
            # write_failure names a full or read-only disk itself; other errors keep their own words.
            known = exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
            message = "the file could not be written" if known else (exc.strerror or str(exc))
            raise FrameError(f"{path}: {write_failure(message, tmp, nbytes)}") from None


def _encode(torch: Any, path: str, channels: Sequence[tuple[str, Any]], types: list[tuple[str, int]],
            metadata: Mapping[str, Any]) -> tuple[bytes, np.ndarray, Any]:
    """The header, the offset table and the chunks (a host tensor) of the file."""
    first = channels[0][1]
    height, width = first.shape
    cuda = first.device.type == "cuda"
    deflate = _nvcomp_deflate(torch) if cuda else None  # also makes the thread's stream current
    lines = line_bytes(torch, channels)
    length = lines.shape[1]
    if deflate is not None and length > MAX_LINE_BYTES:
        raise FrameError(f"{path}: a {length}-byte scanline is too wide for GPU compression")
    if deflate is not None:
        plan = deflate.plan(height, length, first.device)
        plan.predicted[:, :length] = predict(torch, lines)  # after this stream's last use of the plan
        compressed, offsets, sizes = deflate(plan)
        predicted = plan.predicted[:, :length]
    else:
        predicted = predict(torch, lines)
        compressed, offsets, sizes = _zlib_deflate(torch, predicted)
    payload, chunk = chunks(torch, lines, compressed, offsets, sizes, adler32_lines(torch, predicted))
    if cuda:
        host = torch.empty(payload.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        copied = torch.cuda.Event(blocking=True)
        copied.record()
        copied.synchronize()
        payload = host
    header = header_bytes(width, height, types, metadata)
    table = (len(header) + 8 * height + np.concatenate([[0], np.cumsum(chunk)[:-1]])).astype("<u8")
    return header, table, payload


def _forget_codec() -> None:
    """At exit (``nvcomp_memory.on_exit``): this thread's codec goes while Python still runs."""
    _local.__dict__.pop("deflate", None)
