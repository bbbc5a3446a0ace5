"""ZIPS EXRs built by torch code (mlfarm/exr/gpu.py): the file OpenEXR writes, read back bit-exact.

On CPU tensors zlib does the deflate, so these tests check everything around nvCOMP (line layout,
predictor, Adler-32, chunk framing, header, offsets) on machines without a GPU. The nvCOMP path
itself runs in the last tests, which need CUDA and the ``gpu`` extra (run on a GPU host; CI skips).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import OpenEXR
import OpenImageIO as oiio
import pytest
import torch

from mlfarm.exr import gpu as gpu_exr
from mlfarm.exr.io import write_exr, write_planes

NAMES = ["R", "G", "B", "A", "matte.A", "instance.id"]
OUTPUTS = {"rgba": 4, "matte": ("A",), "instance": ("id",)}
META = {"mlfarm/frame": 1001, "mlfarm/job": "j7", "gain": 1.5, "mlfarm/objects": {"detections": [1, 2]},
        "flag": True, "big": 1 << 40}


def planes(height: int, width: int, seed: int = 5) -> np.ndarray:
    """Half planes with flat lines (deflate shrinks them) and lines of noise (it cannot: stored raw)."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((height, width, len(NAMES))).astype(np.float16)
    block[: height // 3] = 0.25
    # Random bits (finite halves) in the last lines: no deflate makes these smaller.
    bits = rng.integers(0, 1 << 10, (height - height // 2, width, len(NAMES)), dtype=np.uint16)
    bits |= rng.integers(0, 31, bits.shape, dtype=np.uint16) << 10  # exponents of finite values
    bits |= rng.integers(0, 2, bits.shape, dtype=np.uint16) << 15
    block[height // 2:] = bits.view(np.float16)
    block[:, :, 5] = np.round(np.abs(block[:, :, 5]))
    return block


def read(path: Path) -> tuple[np.ndarray, oiio.ImageSpec]:
    inp = oiio.ImageInput.open(str(path))
    assert inp is not None, oiio.geterror()
    spec = inp.spec()
    pixels = inp.read_image(0, 0, 0, spec.nchannels, "float")
    assert pixels is not None and not inp.geterror(), inp.geterror()
    inp.close()
    return pixels, spec


def chunk_sizes(path: Path, header_length: int, height: int) -> list[int]:
    data = path.read_bytes()
    offsets = struct.unpack(f"<{height}Q", data[header_length: header_length + 8 * height])
    lines = [struct.unpack("<ii", data[o: o + 8]) for o in offsets]
    assert [y for y, _ in lines] == list(range(height))
    return [size for _, size in lines]


def test_the_file_is_openexrs_own_with_compressed_and_raw_lines(tmp_path):
    height, width = 23, 41
    block = planes(height, width)
    channels = [(n, torch.from_numpy(block[:, :, i].copy())) for i, n in enumerate(NAMES)]
    channels[5] = ("instance.id", channels[5][1].float())  # a float data channel among half ones
    gpu_exr.write_zips(str(tmp_path / "t.exr"), tmp_path, channels, META)
    write_exr(str(tmp_path / "o.exr"), tmp_path, block, NAMES, [False] * 5 + [True], META, "zips")

    ours, spec = read(tmp_path / "t.exr")
    theirs, their_spec = read(tmp_path / "o.exr")
    assert spec.getattribute("compression") == "zips"
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    order = [list(spec.channelnames).index(n) for n in NAMES]
    np.testing.assert_array_equal(ours[:, :, order], block.astype(np.float32))
    assert [str(f) for f in spec.channelformats] == [str(f) for f in their_spec.channelformats]
    assert {a.name: spec.getattribute(a.name) for a in spec.extra_attribs} == \
        {a.name: their_spec.getattribute(a.name) for a in their_spec.extra_attribs}

    header = gpu_exr.header_bytes(width, height, [(n, 1) for n in NAMES[:5]] + [("instance.id", 2)], META)
    assert (tmp_path / "o.exr").read_bytes()[: len(header)] == header  # byte for byte OpenEXR's header
    line = width * (5 * 2 + 4)
    sizes = chunk_sizes(tmp_path / "t.exr", len(header), height)
    assert any(s == line for s in sizes) and any(s < line // 4 for s in sizes)  # both kinds of chunk

    with OpenEXR.File(str(tmp_path / "t.exr")) as exr:  # OpenEXR's own reader agrees
        np.testing.assert_array_equal(exr.channels()["instance.id"].pixels, block[:, :, 5].astype(np.float32))


def test_predictor_and_adler32_are_zlibs_and_openexrs():
    rng = np.random.default_rng(9)
    lines = rng.integers(0, 256, (3, 65536), dtype=np.uint8)  # the longest line nvCOMP takes
    lines[1] = 255  # the largest sums: they must stay exact
    sums = gpu_exr.adler32_lines(torch, torch.from_numpy(lines)).tolist()
    assert sums == [zlib.adler32(r.tobytes()) for r in lines]
    raw = rng.integers(0, 256, (1, 10), dtype=np.uint8)
    split = np.concatenate([raw[0, 0::2], raw[0, 1::2]]).astype(np.int64)
    expected = [split[0]] + [(split[i] - split[i - 1] + 128) % 256 for i in range(1, 10)]
    assert gpu_exr.predict(torch, torch.from_numpy(raw))[0].tolist() == expected


def test_cpu_tensors_are_written_as_numpy_planes_are(tmp_path):
    block = planes(9, 13)
    images = [block[:, :, :4], block[:, :, 4], block[:, :, 5]]
    write_planes(str(tmp_path / "n.exr"), tmp_path, OUTPUTS, images, {"mlfarm/frame": 1}, "zips")
    write_planes(str(tmp_path / "t.exr"), tmp_path, OUTPUTS, [torch.from_numpy(np.array(i)) for i in images],
                 {"mlfarm/frame": 1}, "zips")
    a, spec_a = read(tmp_path / "n.exr")
    b, spec_b = read(tmp_path / "t.exr")
    assert np.array_equal(a, b) and list(spec_a.channelformats) == list(spec_b.channelformats)


def test_only_zips_on_a_cuda_device_with_nvcomp_is_encoded_there():
    assert not gpu_exr.can_encode("zips", True, "cpu")
    assert not gpu_exr.can_encode("zip", True, "cuda")
    assert not gpu_exr.can_encode("zips", False, "cuda")
    assert gpu_exr.can_encode("zips", True, "cuda:0") == gpu_exr.nvcomp_available()


def test_deflate_effort_comes_from_the_settings_and_is_bounded(monkeypatch):
    from pydantic import ValidationError

    from mlfarm.settings import Settings, get_settings

    monkeypatch.setattr(gpu_exr, "DEFLATE_TYPE", None)
    monkeypatch.setenv("MLFARM_EXR_GPU_DEFLATE_EFFORT", "0")
    get_settings.cache_clear()
    try:
        assert gpu_exr.deflate_effort() == 0
        monkeypatch.setattr(gpu_exr, "DEFLATE_TYPE", 4)  # a benchmark's override wins
        assert gpu_exr.deflate_effort() == 4
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("MLFARM_EXR_GPU_DEFLATE_EFFORT", "6")
    with pytest.raises(ValidationError, match="exr_gpu_deflate_effort"):
        Settings()


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_exr.nvcomp_available()),
                         reason="needs CUDA and nvCOMP (pip install '.[gpu]' on a GPU host)")


@gpu
@pytest.mark.parametrize("width", [1920, 4096])
def test_nvcomp_writes_what_openexr_reads_back_bit_exact(tmp_path, width):
    block = planes(270, width)
    device = [torch.from_numpy(np.array(i)).cuda() for i in (block[:, :, :4], block[:, :, 4], block[:, :, 5])]
    device[2] = device[2].float()  # a float data plane, as write_exr is told below
    write_planes(str(tmp_path / "g.exr"), tmp_path, OUTPUTS, device, META, "zips")
    write_exr(str(tmp_path / "o.exr"), tmp_path, block, NAMES, [False] * 5 + [True], META, "zips")
    ours, spec = read(tmp_path / "g.exr")
    theirs, their_spec = read(tmp_path / "o.exr")
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    assert list(spec.channelformats) == list(their_spec.channelformats)
    header = gpu_exr.header_bytes(width, 270, [(n, 1) for n in NAMES[:5]] + [("instance.id", 2)], META)
    line = width * (5 * 2 + 4)
    sizes = chunk_sizes(tmp_path / "g.exr", len(header), 270)
    compressed = sum(s < line for s in sizes)
    assert compressed >= 90, f"only {compressed} of 270 lines were compressed on the GPU"


@gpu
def test_every_deflate_effort_writes_what_openexr_reads_back_exact(tmp_path, monkeypatch):
    """Effort only trades GPU time for size: the pixels are the same, and effort 0 (Huffman only)
    makes the larger file."""
    block = planes(64, 1920)
    device = [torch.from_numpy(np.array(i)).cuda() for i in (block[:, :, :4], block[:, :, 4], block[:, :, 5])]
    sizes = {}
    for effort in (0, 2, 5):
        monkeypatch.setattr(gpu_exr, "DEFLATE_TYPE", effort)
        gpu_exr._local.__dict__.pop("deflate", None)  # codecs are made per thread: a new one with this effort
        path = tmp_path / f"e{effort}.exr"
        write_planes(str(path), tmp_path, OUTPUTS, device, META, "zips")
        ours, spec = read(path)
        order = [list(spec.channelnames).index(n) for n in NAMES]
        np.testing.assert_array_equal(ours[:, :, order], block.astype(np.float32), err_msg=f"effort {effort}")
        sizes[effort] = path.stat().st_size
    gpu_exr._local.__dict__.pop("deflate", None)
    assert sizes[0] > sizes[2] >= sizes[5] * 0.98, sizes


@gpu
def test_frames_written_one_after_another_from_several_threads_each_read_back_exact(tmp_path):
    """Each thread reuses its device buffers and nvCOMP views from frame to frame: no frame may
    show another's bytes, whether the next is written on the same thread or beside it."""
    from concurrent.futures import ThreadPoolExecutor

    blocks = [planes(96, 1920, seed=k) for k in range(12)]

    def write(k):
        device = [torch.from_numpy(np.array(i)).cuda() for i in (blocks[k][:, :, :4], blocks[k][:, :, 4],
                                                                  blocks[k][:, :, 5])]
        write_planes(str(tmp_path / f"f{k}.exr"), tmp_path, OUTPUTS, device, META, "zips")

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(write, range(len(blocks))))
    for k, block in enumerate(blocks):
        ours, spec = read(tmp_path / f"f{k}.exr")
        order = [list(spec.channelnames).index(n) for n in NAMES]
        np.testing.assert_array_equal(ours[:, :, order], block.astype(np.float32), err_msg=f"frame {k}")


@gpu
def test_a_line_too_wide_for_nvcomp_is_written_on_the_cpu(tmp_path):
    block = planes(16, 8192)  # 8192 x (5 half + 1 float) = 112 KiB a line
    device = [torch.from_numpy(np.array(i)).cuda() for i in (block[:, :, :4], block[:, :, 4], block[:, :, 5])]
    device[2] = device[2].float()  # a float data plane, as write_exr is told below
    write_planes(str(tmp_path / "w.exr"), tmp_path, OUTPUTS, device, META, "zips")
    ours, spec = read(tmp_path / "w.exr")
    order = [list(spec.channelnames).index(n) for n in NAMES]
    np.testing.assert_array_equal(ours[:, :, order], block.astype(np.float32))
