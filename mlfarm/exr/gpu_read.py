"""Plain zip EXR plates decoded on the device that uses them: nvCOMP inflates the chunks on the GPU.

Why: a GPU worker's host cores are what limit the fast passes (depth at hundreds of frames/s), and
decoding a 1080p half RGBA zip plate with film grain costs 33-35 ms of a core even through
OpenEXR's binding (docs/benchmarks.md, "Depth's target against the host's arithmetic"). Here the
host only reads the file's bytes, parses its header and offset table and uploads the bytes once;
the GPU inflates every chunk (nvCOMP's batched deflate), undoes OpenEXR's predictor and byte split,
and lays the scanlines out as an H x W x C tensor. This is ``gpu.py``'s writer run backwards.
Measured on an H100 (docs/benchmarks.md), it cuts a decode's host time from 56 to 7.8 ms of a thread
but stops near 130 frames/s a GPU, so ``Settings.exr_gpu_decode`` leaves it off by default.

Only what that fits: one scanline part (no tiles, deep data or parts), channels of half or float
sampled at every pixel, compression none, zips or zip. ``layout`` says None for anything else and
the caller decodes on the host (``io.read_image``). A damaged file is an error, never partial
pixels: chunk framing is checked on the host, and each inflated chunk's Adler-32 against the one
stored after it, on the device.

For CPU tensors the inflate is zlib's: how the tests check this decoder bit for bit against
OpenEXR's on machines without a GPU (the rest is the same torch code on either device).
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import FrameError

NONE, ZIPS, ZIP = 0, 2, 3  # OpenEXR's compression codes this decoder takes
LINES = {NONE: 1, ZIPS: 1, ZIP: 16}  # scanlines a chunk
UINT, HALF, FLOAT = 0, 1, 2
SIZES = {HALF: 2, FLOAT: 4}
_TILED, _LONG_NAMES, _DEEP, _MULTIPART = 0x200, 0x400, 0x800, 0x1000
DAMAGED = "damaged or cut short: some scanline chunks were missing or corrupted"  # io.read_image's words too

_local = threading.local()


@dataclass(frozen=True)
class Layout:
    """What the header and offset table say about a file this decoder takes."""

    width: int
    height: int
    y0: int  # the data window's first line
    channels: tuple[tuple[str, int], ...]  # (name, pixel type) in the file's order (sorted by name)
    compression: int
    offsets: np.ndarray  # each chunk's offset in the file, in line order

    @property
    def lines(self) -> int:
        return LINES[self.compression]

    @property
    def line_bytes(self) -> int:
        return self.width * sum(SIZES[t] for _, t in self.channels)

    def chunk_lines(self, i: int) -> int:
        return min(self.lines, self.height - i * self.lines)


def layout(data: bytes | memoryview | np.ndarray) -> Layout | None:
    """The file's layout, or None where this decoder does not take the file, or cannot parse its
    header (the host decodes it, and names what is wrong). Raises FrameError where the offset table
    is cut short."""
    buf = memoryview(data)
    try:
        magic, version = struct.unpack_from("<ii", buf, 0)
        if magic != 20000630 or version & 0xFF != 2 or version & (_TILED | _DEEP | _MULTIPART):
            return None
        pos, attrs = 8, {}
        while buf[pos] != 0:
            name_end = bytes(buf[pos:pos + 256]).index(b"\0") + pos
            type_end = bytes(buf[name_end + 1:name_end + 257]).index(b"\0") + name_end + 1
            (size,) = struct.unpack_from("<i", buf, type_end + 1)
            start = type_end + 5
            if size < 0 or start + size > len(buf):
                raise ValueError("attribute past the end")
            attrs[bytes(buf[pos:name_end]).decode("latin-1")] = bytes(buf[start:start + size])
            pos = start + size
        pos += 1
    except (struct.error, ValueError, IndexError):
        return None  # the host's decoder says what is wrong with it
    compression = attrs.get("compression", b"\xff")[0]
    if compression not in LINES or "channels" not in attrs or "dataWindow" not in attrs:
        return None
    channels = _channels(attrs["channels"])
    if channels is None:
        return None
    x0, y0, x1, y1 = struct.unpack("<iiii", attrs["dataWindow"])
    width, height = x1 - x0 + 1, y1 - y0 + 1
    if width <= 0 or height <= 0:
        return None
    count = -(-height // LINES[compression])
    if pos + 8 * count > len(buf):
        raise FrameError(DAMAGED)
    offsets = np.frombuffer(buf, dtype="<u8", count=count, offset=pos).astype(np.int64)
    return Layout(width, height, y0, channels, compression, offsets)


def _channels(chlist: bytes) -> tuple[tuple[str, int], ...] | None:
    """(name, type) of each channel; None where one is not half or float at every pixel."""
    out, pos = [], 0
    while pos < len(chlist) and chlist[pos] != 0:
        end = chlist.index(b"\0", pos)
        kind, _linear, xs, ys = struct.unpack_from("<iB3xii", chlist, end + 1)
        if kind not in SIZES or xs != 1 or ys != 1:
            return None
        out.append((chlist[pos:end].decode("utf-8", "replace"), kind))
        pos = end + 17
    return tuple(out) or None


@dataclass
class _Chunks:
    """Where each chunk's data lies in the file, and which are compressed."""

    starts: np.ndarray  # offset of each chunk's data (past its y and size)
    sizes: np.ndarray  # bytes of data
    raw: np.ndarray  # bytes the chunk's lines take uncompressed
    packed: np.ndarray  # bool: zlib stream (else the raw lines, stored)


def chunks(buf: memoryview, lay: Layout) -> _Chunks:
    """Every chunk's framing, checked: inside the file, at its own lines, no larger than its lines."""
    n = len(lay.offsets)
    if n and (lay.offsets.min() < 0 or lay.offsets.max() + 8 > len(buf)):
        raise FrameError(DAMAGED)
    heads = np.frombuffer(buf, dtype=np.uint8)[lay.offsets[:, None] + np.arange(8)].copy().view("<i4")
    ys, sizes = heads[:, 0].astype(np.int64), heads[:, 1].astype(np.int64)
    raw = np.array([lay.chunk_lines(i) for i in range(n)], dtype=np.int64) * lay.line_bytes
    starts = lay.offsets + 8
    expected = lay.y0 + np.arange(n, dtype=np.int64) * lay.lines
    if (ys != expected).any() or (sizes <= 0).any() or (sizes > raw).any() or (starts + sizes > len(buf)).any():
        raise FrameError(DAMAGED)
    packed = sizes < raw if lay.compression != NONE else np.zeros(n, dtype=bool)
    if (packed & (sizes < 6)).any():
        raise FrameError(DAMAGED)
    return _Chunks(starts, sizes, raw, packed)


def read_file(torch: Any, path: str, pin: bool) -> Any:
    """The file's bytes as a uint8 tensor, read straight into pinned memory where ``pin`` (for one
    upload to a GPU without a staging copy)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        out = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        if size and f.readinto(memoryview(out.numpy())) != size:
            raise FrameError(DAMAGED)
    return out


def decode(torch: Any, file: Any, lay: Layout, names: Sequence[str], device: Any, half: bool = False) -> Any:
    """The pixels (H x W x C tensor on ``device``, channels in ``names``' order) of the file whose
    bytes are the host tensor ``file`` (pinned, for a GPU: ``read_file``) and layout ``lay``.
    Float16 where ``half`` and every channel is half, else float32.

    On CUDA the work is queued on the current stream; the caller waits for it, then calls ``check``.
    """
    _local.bad = None  # a check left by an earlier decode that failed before ``check`` is not this file's
    buf = memoryview(file.numpy())
    found = dict(lay.channels)
    if any(n not in found for n in names):
        raise FrameError(f"channels {', '.join(n for n in names if n not in found)} are not in the file")
    ch = chunks(buf, lay)
    device = torch.device(device)
    rows = _inflate(torch, file, buf, ch, device)  # one row per chunk: its lines' bytes, OpenEXR's layout
    width = int(ch.raw.max())  # rows may be wider (aligned for nvCOMP)
    lines = rows[:, :width].reshape(-1)[: lay.height * lay.line_bytes].view(lay.height, lay.line_bytes)
    keep = half and all(found[n] == HALF for n in names)
    out = torch.empty(lay.height, lay.width, len(names), dtype=torch.float16 if keep else torch.float32,
                      device=device)
    at, index = 0, {n: i for i, n in enumerate(names)}
    for name, kind in lay.channels:
        span = lay.width * SIZES[kind]
        if name in index:
            plane = lines[:, at:at + span].contiguous().view(torch.float16 if kind == HALF else torch.float32)
            out[:, :, index[name]] = plane
        at += span
    return out


def _inflate(torch: Any, file: Any, buf: memoryview, ch: _Chunks, device: Any) -> Any:
    """Chunks x widest chunk bytes: each chunk's lines as OpenEXR lays them out (inflated, the
    predictor and the byte split undone; stored chunks copied)."""
    n, width = len(ch.raw), int(ch.raw.max())
    if device.type == "cuda":
        codec = _codec(torch, width)
        rows = torch.empty(n, -(-width // codec.align) * codec.align, dtype=torch.uint8, device=device)
        file = file.to(device, non_blocking=True)
        packed = np.flatnonzero(ch.packed)
        if len(packed):
            _nvcomp_inflate(torch, codec, file, rows, ch, packed)
    else:
        rows = torch.empty(n, width, dtype=torch.uint8)
        for i in np.flatnonzero(ch.packed):
            s, size = int(ch.starts[i]), int(ch.sizes[i])
            try:
                inflated = zlib.decompress(buf[s:s + size])
            except zlib.error:
                raise FrameError(DAMAGED) from None
            if len(inflated) != ch.raw[i]:
                raise FrameError(DAMAGED)
            rows[i, : len(inflated)] = torch.frombuffer(bytearray(inflated), dtype=torch.uint8)
    for i in np.flatnonzero(~ch.packed):  # stored as the raw lines
        s, size = int(ch.starts[i]), int(ch.sizes[i])
        rows[i, :size] = file[s:s + size]
    for group in _same_length(ch.raw, ch.packed):
        length = int(ch.raw[group[0]])
        index = torch.from_numpy(group).to(device)
        rows[index, :length] = unpredict(torch, rows[index, :length])
    return rows


def _same_length(raw: np.ndarray, packed: np.ndarray) -> list[np.ndarray]:
    """The packed chunks grouped by length (all but a short last one share it)."""
    return [np.flatnonzero(packed & (raw == length)) for length in np.unique(raw[packed])]


def unpredict(torch: Any, rows: Any) -> Any:
    """OpenEXR's zip predictor and byte split undone, on each row (``gpu.predict`` backwards).

    The predictor stored t[0] and then t[i] - t[i-1] + 128 (mod 256), so t[i] is the running sum of
    the stored bytes less 128 i, i.e. plus 128 at odd i (mod 256); the split stored the even bytes
    of the line first, then the odd ones.
    """
    n = rows.shape[1]
    t = torch.cumsum(rows, 1, dtype=torch.uint8)
    t[:, 1::2] ^= 0x80
    out = torch.empty_like(t)
    half = (n + 1) // 2
    out[:, 0::2] = t[:, :half]
    out[:, 1::2] = t[:, half:]
    return out


def _nvcomp_inflate(torch: Any, codec: _Codec, file: Any, rows: Any, ch: _Chunks, packed: np.ndarray) -> None:
    """nvCOMP's raw inflate of each packed chunk's deflate stream (past zlib's 2-byte header, before
    its 4-byte Adler-32) into its row, then each row's Adler-32 checked against the stored one."""
    from .gpu import adler32_lines

    nvcomp, stream = codec.nvcomp, torch.cuda.current_stream(rows.device).cuda_stream
    starts, sizes = ch.starts[packed] + 2, ch.sizes[packed] - 6
    source = file
    if codec.align > 1 and (starts % codec.align).any():  # streams moved to aligned offsets of their own
        source, starts = _aligned(torch, file, starts, sizes, codec.align)
    src = nvcomp.as_arrays(source, starts.tolist(), sizes.tolist(), stream)
    dst = nvcomp.as_arrays(rows.view(-1), (packed * rows.shape[1]).tolist(), ch.raw[packed].tolist(), stream)
    config = codec.codec.decompression_config(codec.codec.compression_config(ch.raw[packed].tolist()))
    codec.codec.decode(src, out=dst, decompression_config=config)
    # zlib's check value: the last 4 bytes of each chunk, big-endian.
    at = torch.from_numpy(ch.starts[packed] + ch.sizes[packed] - 4).to(rows.device)
    stored = file[at[:, None] + torch.arange(4, device=rows.device)].to(torch.int64)
    stored = (stored[:, 0] << 24) | (stored[:, 1] << 16) | (stored[:, 2] << 8) | stored[:, 3]
    bad = torch.zeros((), dtype=torch.bool, device=rows.device)
    for group in _same_length(ch.raw, ch.packed):
        length = int(ch.raw[group[0]])
        sums = adler32_lines(torch, rows[torch.from_numpy(group).to(rows.device), :length])
        mine = torch.from_numpy(np.searchsorted(packed, group)).to(rows.device)
        bad |= (sums != stored[mine]).any()
    _local.bad = bad  # read by ``check`` after the caller's sync


def _aligned(torch: Any, file: Any, starts: np.ndarray, sizes: np.ndarray, align: int) -> tuple[Any, np.ndarray]:
    """The byte ranges ``starts``/``sizes`` of ``file`` (a device tensor) copied on the device into a new
    buffer, each at an offset that is a multiple of ``align``; the buffer and those offsets."""
    padded = -(-sizes // align) * align
    at = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
    device, total = file.device, int(sizes.sum())
    within = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.from_numpy(sizes).to(device),
                                  output_size=total)
    offset = torch.arange(total, device=device) - torch.from_numpy(within).to(device)[ids]
    out = torch.empty(int(padded.sum()), dtype=torch.uint8, device=device)
    out[torch.from_numpy(at).to(device)[ids] + offset] = file[torch.from_numpy(starts).to(device)[ids] + offset]
    return out, at


def check() -> None:
    """After the device work of this thread's last ``decode`` finished: raise if a chunk's check failed."""
    bad = getattr(_local, "bad", None)
    _local.bad = None
    if bad is not None and bool(bad):
        raise FrameError(DAMAGED)


class _Codec:
    """This thread's nvCOMP deflate codec (a codec is not to be shared between threads), on its
    stream, for chunks up to ``chunk_bytes`` (nvCOMP's default is 64 KiB; a zip chunk of a 1080p
    RGBA half plate is 240 KiB)."""

    def __init__(self, torch: Any, chunk_bytes: int):
        from nvidia import nvcomp

        from . import nvcomp_memory
        from .gpu import thread_stream

        nvcomp_memory.install(torch)
        nvcomp_memory.on_exit(_forget_codec)
        self.nvcomp = nvcomp
        self.stream = thread_stream(torch)
        self.chunk_bytes = chunk_bytes
        self.codec = nvcomp.Codec(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW,
                                  uncomp_chunk_size=chunk_bytes, cuda_stream=self.stream.cuda_stream)
        self.align = max(1, int(self.codec.get_required_decompression_alignment()))


def _codec(torch: Any, chunk_bytes: int) -> _Codec:
    codec = getattr(_local, "codec", None)
    if codec is None or codec.stream != torch.cuda.current_stream() or codec.chunk_bytes < chunk_bytes:
        codec = _local.codec = _Codec(torch, max(chunk_bytes, 1 << 16))
    return codec


def _forget_codec() -> None:
    """At exit (``nvcomp_memory.on_exit``): this thread's codec goes while Python still runs."""
    _local.__dict__.pop("codec", None)
