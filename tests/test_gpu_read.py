"""Plates decoded on the device (mlfarm.exr.gpu_read): the same pixels as OpenImageIO decodes, for
every file it takes (zip, zips, none; half, float, mixed; layers; shifted data windows; chunks that
were stored uncompressed), None for the files it leaves to the host, and damage an error.

On the CPU the inflate is zlib's and the rest is the torch code a GPU runs; the tests marked ``gpu``
run the nvCOMP path too, through ``read_image(device="cuda")``, on a machine that has one."""

from __future__ import annotations

import numpy as np
import OpenImageIO as oiio
import pytest
import torch

from mlfarm.exr import gpu as gpu_exr
from mlfarm.exr import gpu_read
from mlfarm.exr.common import FrameError
from mlfarm.exr.io import read_image


def write(path, channels, formats, compression, pixels, x=0, y=0) -> str:
    spec = oiio.ImageSpec(pixels.shape[1], pixels.shape[0], len(channels), oiio.TypeDesc(formats[0]))
    spec.channelnames = channels
    if len(set(formats)) > 1:
        spec.channelformats = tuple(oiio.TypeDesc(f) for f in formats)
    spec.x, spec.y = x, y
    spec.attribute("compression", compression)
    out = oiio.ImageOutput.create("openexr")
    assert out.open(str(path), spec), oiio.geterror()
    assert out.write_image(pixels.astype(np.float32))
    assert out.close()
    return str(path)


def reference(path) -> tuple[np.ndarray, list[str]]:
    inp = oiio.ImageInput.open(path)
    spec = inp.spec()
    pixels = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float")).reshape(spec.height, spec.width, -1)
    inp.close()
    return pixels, list(spec.channelnames)


def plate(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """Smooth gradients (compress well) with grain on one side (compresses badly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(xx / w) * (k + 1) + yy / h for k in range(c)], -1)
    base[:, w // 2:] += rng.normal(0, 0.3, (h, w - w // 2, c)).astype(np.float32)
    return base


VARIANTS = {
    # name: channels, formats, compression, size (h, w), data window origin
    "half_zip": (("R", "G", "B", "A"), ("half",) * 4, "zip", (37, 53), (0, 0)),
    "half_zips": (("R", "G", "B", "A"), ("half",) * 4, "zips", (21, 40), (0, 0)),
    "half_none": (("R", "G", "B"), ("half",) * 3, "none", (9, 17), (0, 0)),
    "float_layers_window": (("R", "G", "B", "A", "depth.Z", "forward.u"), ("float",) * 6, "zip", (35, 29), (5, -7)),
    "mixed_half_float": (("R", "G", "B", "A", "depth.Z"), ("half",) * 4 + ("float",), "zip", (33, 31), (0, 0)),
    "one_line": (("Y",), ("half",), "zip", (1, 64), (0, 0)),
}


def decoded(path: str, names, half: bool):
    file = gpu_read.read_file(torch, path, pin=False)
    lay = gpu_read.layout(file.numpy())
    assert lay is not None
    return gpu_read.decode(torch, file, lay, names, "cpu", half), lay, file


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_pixels_are_openimageios_bit_for_bit(tmp_path, name):
    channels, formats, compression, (h, w), (x, y) = VARIANTS[name]
    path = write(tmp_path / f"{name}.exr", channels, formats, compression, plate(h, w, len(channels), 1), x, y)
    expected, names = reference(path)
    pixels, lay, _ = decoded(path, names, half=False)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == expected.shape
    np.testing.assert_array_equal(pixels.numpy(), expected)
    kept, _, _ = decoded(path, names, half=True)  # half stays half only where every channel is half
    assert kept.dtype == (torch.float16 if set(formats) == {"half"} else torch.float32)
    np.testing.assert_array_equal(kept.float().numpy(), expected)
    assert lay.compression == {"zip": gpu_read.ZIP, "zips": gpu_read.ZIPS, "none": gpu_read.NONE}[compression]


def test_chunks_stored_uncompressed_are_copied_as_they_are(tmp_path):
    """Where deflate does not make a chunk smaller OpenEXR stores its lines raw, with no predictor:
    float noise does that; the smooth half of the plate stays compressed."""
    pixels = plate(48, 40, 3, 2)
    pixels[:24] = np.random.default_rng(5).uniform(-1e6, 1e6, (24, 40, 3))
    path = write(tmp_path / "noise.exr", ("R", "G", "B"), ("float",) * 3, "zip", pixels)
    expected, names = reference(path)
    got, lay, file = decoded(path, names, half=False)
    ch = gpu_read.chunks(memoryview(file.numpy()), lay)
    assert not ch.packed.all() and ch.packed.any(), ch.packed  # both kinds in one file
    np.testing.assert_array_equal(got.numpy(), expected)


def test_channels_come_in_the_order_asked_for(tmp_path):
    path = write(tmp_path / "o.exr", ("R", "G", "B", "A"), ("half",) * 4, "zip", plate(20, 20, 4, 3))
    expected, names = reference(path)
    got, _, _ = decoded(path, ["A", "R"], half=True)
    np.testing.assert_array_equal(got.float().numpy(), expected[:, :, [names.index("A"), names.index("R")]])


@pytest.mark.parametrize("compression, channels, formats", [
    ("piz", ("R", "G", "B"), ("half",) * 3),
    ("dwaa", ("R", "G", "B"), ("half",) * 3),
    ("rle", ("R", "G", "B"), ("half",) * 3),
    ("zip", ("R", "G", "id"), ("half", "half", "uint")),
])
def test_files_it_does_not_take_are_left_to_the_host(tmp_path, compression, channels, formats):
    path = write(tmp_path / "x.exr", channels, formats, compression, plate(20, 24, len(channels), 4))
    assert gpu_read.layout(gpu_read.read_file(torch, path, pin=False).numpy()) is None


def test_tiled_files_are_left_to_the_host(tmp_path):
    spec = oiio.ImageSpec(40, 40, 3, oiio.HALF)
    spec.tile_width = spec.tile_height = 16
    spec.attribute("compression", "zip")
    out = oiio.ImageOutput.create("openexr")
    assert out.open(str(tmp_path / "t.exr"), spec)
    assert out.write_image(plate(40, 40, 3, 5))
    assert out.close()
    assert gpu_read.layout(gpu_read.read_file(torch, str(tmp_path / "t.exr"), pin=False).numpy()) is None


@pytest.mark.parametrize("damage", ["cut", "zeroed", "wrong_line", "table"])
def test_damage_is_an_error_never_partial_pixels(tmp_path, damage):
    path = write(tmp_path / "good.exr", ("R", "G", "B", "A"), ("half",) * 4, "zip", plate(64, 96, 4, 6))
    data = bytearray(open(path, "rb").read())
    lay = gpu_read.layout(bytes(data))
    last = int(lay.offsets[-1])
    if damage == "cut":
        data = data[: len(data) * 3 // 4]
    elif damage == "zeroed":  # zeros inside the last chunk's deflate stream
        data[last + 20:last + 120] = bytes(100)
    elif damage == "wrong_line":  # a chunk that says it holds other lines
        data[last:last + 4] = (7).to_bytes(4, "little")
    else:  # the last chunk's offset (the table's last entry, just before the first chunk) past the end
        entry = int(lay.offsets[0]) - 8
        data[entry:entry + 8] = (len(data) + 99).to_bytes(8, "little")
    bad = tmp_path / "bad.exr"
    bad.write_bytes(bytes(data))
    file = gpu_read.read_file(torch, str(bad), pin=False)
    with pytest.raises(FrameError, match="missing or corrupted"):
        got = gpu_read.layout(file.numpy())
        assert got is not None
        gpu_read.decode(torch, file, got, ["R", "G", "B", "A"], "cpu")


@pytest.mark.parametrize("length", [1, 2, 7, 64, 1001])
def test_unpredict_undoes_the_writers_predictor(length):
    rows = torch.randint(0, 256, (5, length), dtype=torch.uint8)
    np.testing.assert_array_equal(gpu_read.unpredict(torch, gpu_exr.predict(torch, rows)).numpy(), rows.numpy())


@pytest.mark.parametrize("align", [4, 16])
def test_streams_are_moved_to_aligned_offsets_whole(align):
    """Where nvCOMP needs its inputs aligned, each chunk's deflate stream is copied (on the device)
    to an aligned offset of its own: every byte arrives, in order, nothing of its neighbours."""
    file = torch.randint(0, 256, (500,), dtype=torch.uint8)
    starts, sizes = np.array([3, 40, 41, 97, 250], dtype=np.int64), np.array([30, 1, 50, 7, 249], dtype=np.int64)
    out, at = gpu_read._aligned(torch, file, starts, sizes, align)
    assert (at % align == 0).all()
    for s, n, a in zip(starts, sizes, at):
        np.testing.assert_array_equal(out[a:a + n].numpy(), file[s:s + n].numpy())


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and gpu_exr.nvcomp_available()),
                         reason="needs a CUDA GPU and nvCOMP (pip install 'mlfarm[gpu]')")


@gpu
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_read_image_on_a_gpu_gives_the_hosts_pixels(tmp_path, name):
    channels, formats, compression, (h, w), (x, y) = VARIANTS[name]
    path = write(tmp_path / f"{name}.exr", channels, formats, compression, plate(h, w, len(channels), 7), x, y)
    host = read_image(path, half=True)
    device = read_image(path, half=True, device="cuda")
    assert device.channels == host.channels
    assert device.pixels.is_cuda and str(device.pixels.dtype).endswith(str(host.pixels.dtype))
    np.testing.assert_array_equal(device.pixels.cpu().numpy(), host.pixels)


@gpu
def test_a_1080p_plate_with_grain_decodes_on_the_gpu_as_on_the_host(tmp_path):
    for compression in ("zip", "zips"):
        path = write(tmp_path / f"p_{compression}.exr", ("R", "G", "B", "A"), ("half",) * 4, compression,
                     plate(1080, 1920, 4, 8))
        host = read_image(path, half=True)
        device = read_image(path, half=True, device="cuda")
        np.testing.assert_array_equal(device.pixels.cpu().numpy(), host.pixels)


@gpu
def test_a_damaged_plate_is_an_error_on_the_gpu_too(tmp_path):
    path = write(tmp_path / "good.exr", ("R", "G", "B", "A"), ("half",) * 4, "zip", plate(64, 96, 4, 9))
    data = bytearray(open(path, "rb").read())
    last = int(gpu_read.layout(bytes(data)).offsets[-1])
    data[last + 20:last + 120] = bytes(100)
    (tmp_path / "bad.exr").write_bytes(bytes(data))
    with pytest.raises(FrameError, match="missing or corrupted"):
        read_image(str(tmp_path / "bad.exr"), device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where decoding on CUDA fails")
def test_where_decoding_on_the_device_fails_the_host_decodes_and_takes_over(tmp_path, caplog):
    """A fault of the device's decoding (here: no CUDA at all) never fails a good frame: the host's
    pixels come back, a warning says so, and later frames go straight to the host. A damaged file
    still fails, with the host's words."""
    from mlfarm.exr import io

    path = write(tmp_path / "p.exr", ("R", "G", "B", "A"), ("half",) * 4, "zip", plate(32, 48, 4, 10))
    data = bytearray(open(path, "rb").read())
    last = int(gpu_read.layout(bytes(data)).offsets[-1])
    data[last + 20:last + 120] = bytes(100)
    (tmp_path / "bad.exr").write_bytes(bytes(data))
    io._device_decode["broken"] = False
    try:
        with pytest.raises(FrameError, match=f"^{tmp_path / 'bad.exr'}: .*missing or corrupted"):
            read_image(str(tmp_path / "bad.exr"), device="cuda")
        assert not io._device_decode["broken"]  # a damaged file says nothing about the device
        image = read_image(path, half=True, device="cuda")
        assert isinstance(image.pixels, np.ndarray)
        np.testing.assert_array_equal(image.pixels, read_image(path, half=True).pixels)
        assert io._device_decode["broken"]
        assert "decoding plates on the host from now on" in caplog.text
    finally:
        io._device_decode["broken"] = False
