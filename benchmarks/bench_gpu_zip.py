"""Could a GPU worker stop spending CPU on EXR compression? A prototype, measured against the writer.

Mask R-CNN's worker is CPU-bound with zip outputs (README, Mask R-CNN speed): encoding eight half
channels costs ~0.35 core-seconds a frame. This prototype compresses the same H x W x 8 half block
on the GPU as a ZIPS EXR (one scanline a chunk, what Nuke writes by default): OpenEXR's byte split
and delta predictor in torch, then nvCOMP's deflate (``nvidia-nvcomp-cu13``; a single deflate
stream is limited in size, and a 16-line ZIP chunk is too big for it), Adler-32 sums in torch, and
the file (header, offset table, chunks) assembled on the CPU. It checks the file against OpenImageIO
(bit-exact) and prints the encode time (wall, time on the stream, and the calling thread's CPU),
the copy-back and assembling time and the size, against frame_io.write_exr (zips and zip) in the
same run. Without a GPU (or nvCOMP) it runs the same format with zlib on the CPU, to
check the file format itself.

Not used by the worker: the numbers decide whether it is worth building into it.

Run: python benchmarks/bench_gpu_zip.py [--frames 20]
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from bench_exr_planes import planes

NAMES = ["R", "G", "B", "A", "matte.A", "instance.id", "class.id", "score.value"]
HALF, ZIPS = 1, 2  # OpenEXR's pixel type and compression codes


def _attr(name: str, kind: str, value: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value


def exr_header(width: int, height: int, channels: list[str], metadata: dict[str, str]) -> bytes:
    chlist = b"".join(c.encode() + b"\0" + struct.pack("<iB3xii", HALF, 0, 1, 1) for c in channels) + b"\0"
    box = struct.pack("<iiii", 0, 0, width - 1, height - 1)
    attrs = [_attr("channels", "chlist", chlist), _attr("compression", "compression", bytes([ZIPS])),
             _attr("dataWindow", "box2i", box), _attr("displayWindow", "box2i", box),
             _attr("lineOrder", "lineOrder", b"\0"), _attr("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
             _attr("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
             _attr("screenWindowWidth", "float", struct.pack("<f", 1.0))]
    attrs += [_attr(k, "string", v.encode()) for k, v in metadata.items()]
    return struct.pack("<ii", 20000630, 2) + b"".join(attrs) + b"\0"


def write_zips(path: Path, width: int, height: int, channels: list[str], lines: list[bytes], raw_size: int,
               metadata: dict[str, str]) -> None:
    """The file: header, one offset per scanline, then each scanline's chunk (y, size, data)."""
    header = exr_header(width, height, channels, metadata)
    at = len(header) + 8 * height
    offsets = []
    for data in lines:
        offsets.append(at)
        at += 8 + len(data)
    with open(path, "wb") as f:
        f.write(header)
        f.write(struct.pack(f"<{height}Q", *offsets))
        for y, data in enumerate(lines):
            f.write(struct.pack("<ii", y, len(data)))
            f.write(data)
    assert all(len(d) <= raw_size for d in lines)


def predicted_lines(torch, block, order: list[int]):
    """Each scanline's bytes as OpenEXR's zip compressor feeds them to deflate: channels in name
    order, each line's bytes split into even and odd, then byte deltas (+128)."""
    height, width = block.shape[:2]
    rows = block[:, :, order].permute(0, 2, 1).contiguous().view(torch.uint8).reshape(height, -1)
    split = torch.cat([rows[:, 0::2], rows[:, 1::2]], dim=1).to(torch.int16)
    out = split.clone()
    out[:, 1:] = (split[:, 1:] - split[:, :-1] + 128) & 0xFF
    return out.to(torch.uint8)


def adler32_rows(torch, rows):
    """Adler-32 of every row (int64 sums stay exact for rows up to ~50 MB)."""
    n = rows.shape[1]
    b = rows.to(torch.int64)
    a = (1 + b.sum(1)) % 65521
    weights = torch.arange(n, 0, -1, device=rows.device, dtype=torch.int64)
    s = (n + (b * weights).sum(1)) % 65521
    return (s << 16) | a


def zlib_wrap(raw_deflate: bytes, adler: int) -> bytes:
    return b"\x78\x01" + raw_deflate + struct.pack(">I", adler)


def encode_gpu(torch, nvcomp, codec, block, order):
    rows = predicted_lines(torch, block, order)
    sums = adler32_rows(torch, rows)
    encoded = codec.encode(nvcomp.as_arrays([rows[y] for y in range(rows.shape[0])]))
    return rows, sums, encoded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--algorithm-type", type=int, default=2, help="nvCOMP deflate: 0 fastest ... 5 smallest")
    args = ap.parse_args()

    import OpenImageIO as oiio
    import torch

    from mlfarm.worker.frame_io import write_exr

    root = Path(tempfile.mkdtemp(prefix="mlfarm-gpuzip-"))
    images = planes(0.01, args.width, args.height, True, True)
    block_host = images[0].base
    assert block_host is not None and block_host.shape[2] == len(NAMES)
    order = sorted(range(len(NAMES)), key=lambda i: NAMES[i])
    channels = [NAMES[i] for i in order]
    raw_size = args.width * len(NAMES) * 2
    meta = {"mlfarm/job": "bench"}

    for compression in ("zips", "zip"):  # the baseline: the worker's writer, the same block
        t = time.process_time()
        for _ in range(args.frames):
            write_exr(str(root / f"base.{compression}.exr"), root, block_host, NAMES, [False] * 8, meta, compression)
        ms = (time.process_time() - t) / args.frames * 1000
        size = os.path.getsize(root / f"base.{compression}.exr") / 1e6
        print(f"frame_io.write_exr {compression:4s}: {ms:6.1f} ms CPU a frame, {size:.2f} MB", flush=True)

    cuda = torch.cuda.is_available()
    nvcomp = None
    if cuda:
        try:
            from nvidia import nvcomp
        except ImportError as exc:
            print(f"no nvCOMP ({exc}): deflate on the CPU instead", flush=True)
    if nvcomp is not None:
        device = torch.device("cuda")
        block = torch.from_numpy(block_host).to(device)
        # On torch's stream: nvCOMP's own default stream would not wait for the predictor's kernels.
        codec = nvcomp.Codec(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW,
                             algorithm_type=args.algorithm_type, uncomp_chunk_size=65536,
                             cuda_stream=torch.cuda.current_stream().cuda_stream)
        for _ in range(3):
            encode_gpu(torch, nvcomp, codec, block, order)
        torch.cuda.synchronize()
        gpu_s = copy_s = cpu_s = call_s = kernel_ms = 0.0
        for _ in range(args.frames):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t, tc = time.perf_counter(), time.thread_time()
            start.record()
            rows, sums, encoded = encode_gpu(torch, nvcomp, codec, block, order)
            end.record()
            call_s += time.thread_time() - tc
            torch.cuda.synchronize()
            kernel_ms += start.elapsed_time(end)
            t1 = time.perf_counter()
            host = [np.asarray(e.cpu()).tobytes() for e in encoded]  # one copy a line: to be batched
            adler = sums.cpu().tolist()
            t2 = time.perf_counter()
            gpu_s += t1 - t
            copy_s += t2 - t1
            t = time.process_time()
            lines = []
            for y, data in enumerate(host):
                wrapped = zlib_wrap(data, adler[y])
                lines.append(wrapped if len(wrapped) < raw_size else rows[y].cpu().numpy().tobytes())
            write_zips(root / "gpu.exr", args.width, args.height, channels, lines, raw_size, meta)
            cpu_s += time.process_time() - t
        print(f"  GPU predictor + Adler-32 + nvCOMP deflate {gpu_s / args.frames * 1000:.2f} ms a frame (wall), "
              f"{kernel_ms / args.frames:.2f} ms between events on the stream, {call_s / args.frames * 1000:.2f} ms "
              f"CPU of the calling thread; copies back line by line {copy_s / args.frames * 1000:.2f} ms", flush=True)
        label = f"GPU (nvCOMP deflate, type {args.algorithm_type})"
    else:
        # The GPU path with zlib's raw deflate in nvCOMP's place: checks the predictor, the Adler-32
        # sums, the zlib wrapping and the file.
        rows_t = predicted_lines(torch, torch.from_numpy(block_host), order)
        adler = adler32_rows(torch, rows_t).tolist()
        rows = rows_t.numpy()
        assert adler[:8] == [zlib.adler32(r.tobytes()) for r in rows[:8]], "Adler-32 differs from zlib's"
        gpu_s = 0.0
        t = time.process_time()
        for _ in range(max(1, args.frames // 4)):
            lines = []
            for y, r in enumerate(rows):
                deflate = zlib.compressobj(1, zlib.DEFLATED, -15)
                wrapped = zlib_wrap(deflate.compress(r.tobytes()) + deflate.flush(), adler[y])
                lines.append(wrapped if len(wrapped) < raw_size else r.tobytes())
            write_zips(root / "gpu.exr", args.width, args.height, channels, lines, raw_size, meta)
        cpu_s = (time.process_time() - t) * args.frames / max(1, args.frames // 4)
        label = "CPU zlib (format check only)"

    inp = oiio.ImageInput.open(str(root / "gpu.exr"))
    assert inp is not None, oiio.geterror()
    spec = inp.spec()
    got = inp.read_image(0, 0, 0, spec.nchannels, "half")
    inp.close()
    assert got is not None, oiio.geterror()
    back = [list(spec.channelnames).index(n) for n in NAMES]
    exact = np.array_equal(got[:, :, back].view(np.uint16), block_host.view(np.uint16))
    size = os.path.getsize(root / "gpu.exr") / 1e6
    print(f"{label}: {gpu_s / args.frames * 1000:6.1f} ms a frame encoding (wall), "
          f"{cpu_s / args.frames * 1000:6.1f} ms CPU a frame to assemble and write, {size:.2f} MB; "
          f"OpenImageIO reads it back {'bit-exact' if exact else 'WRONG'} ({spec.getattribute('compression')})",
          flush=True)
    for f in root.iterdir():
        f.unlink()
    root.rmdir()
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
