"""Frame I/O formats: half frames read without conversion, all-half outputs written as given,
mixed outputs still keep float data planes, and OpenEXR's thread pool follows the settings.
Plain EXRs are decoded by OpenEXR's binding, the rest by OpenImageIO: both give OpenImageIO's
pixels and channel order, and damage is an error."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import OpenImageIO as oiio
import pytest

from mlfarm.exr.common import FrameError
from mlfarm.exr.io import assemble_planes, configure_openexr, read_image, write_exr
from mlfarm.settings import Settings

OUTPUTS = {"rgba": 4, "matte": ("A",), "instance": ("id",)}


def write_plate(path, pixels: np.ndarray, fmt) -> None:
    h, w, c = pixels.shape
    spec = oiio.ImageSpec(w, h, c, fmt)
    spec.channelnames = ("R", "G", "B", "A")[:c]
    out = oiio.ImageOutput.create("openexr")
    assert out.open(str(path), spec), oiio.geterror()
    assert out.write_image(pixels)
    assert out.close()


def formats_of(path) -> dict[str, str]:
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    inp.close()
    fmts = spec.channelformats or (spec.format,) * spec.nchannels
    return dict(zip(spec.channelnames, (str(f) for f in fmts)))


def test_a_half_plate_is_read_as_float32_with_the_same_values(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.uniform(-2, 40, (6, 9, 4)).astype(np.float16)
    write_plate(tmp_path / "h.exr", pixels, oiio.HALF)
    image = read_image(str(tmp_path / "h.exr"))
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.rgba(4), pixels.astype(np.float32))


def openimageio_read(path) -> tuple[np.ndarray, list[str]]:
    """What OpenImageIO alone decodes: the reference for every read path."""
    inp = oiio.ImageInput.open(str(path))
    spec = inp.spec()
    pixels = np.asarray(inp.read_image(0, 0, 0, spec.nchannels, "float"))
    inp.close()
    return pixels.reshape(spec.height, spec.width, spec.nchannels), list(spec.channelnames)


def write_spec(path, spec: oiio.ImageSpec, pixels: np.ndarray) -> None:
    out = oiio.ImageOutput.create("openexr")
    assert out.open(str(path), spec), oiio.geterror()
    assert out.write_image(pixels)
    assert out.close()


def exr_variants(folder) -> dict[str, str]:
    """EXRs the binding decodes (half zip, float piz with layers and a shifted data window, dwaa,
    luminance only) and ones left to OpenImageIO (an integer channel, tiles)."""
    rng = np.random.default_rng(11)
    made = {}

    def spec(name, channels, fmt, **attrs):
        sp = oiio.ImageSpec(37, 21, len(channels), fmt)
        sp.channelnames = channels
        for key, value in attrs.items():
            if key in ("x", "y", "tile_width", "tile_height"):
                setattr(sp, key, value)
            elif key == "formats":
                sp.channelformats = value
            else:
                sp.attribute(key, value)
        path = str(folder / f"{name}.exr")
        write_spec(path, sp, rng.uniform(-1, 60, (21, 37, len(channels))).astype(np.float32))
        made[name] = path

    spec("half_zip", ("R", "G", "B", "A"), oiio.HALF, compression="zip")
    spec("float_layers", ("R", "G", "B", "A", "depth.Z", "zz", "forward.u"), oiio.FLOAT, compression="piz", x=3, y=9)
    spec("dwaa", ("R", "G", "B"), oiio.HALF, compression="dwaa")
    spec("luminance", ("Y",), oiio.FLOAT)
    spec("uint_channel", ("R", "G", "id"), oiio.HALF,
         formats=(oiio.TypeDesc("half"), oiio.TypeDesc("float"), oiio.TypeDesc("uint")))
    spec("tiled", ("R", "G", "B", "A"), oiio.HALF, tile_width=16, tile_height=16)
    spec("float_rgba", ("R", "G", "B", "A"), oiio.FLOAT, compression="zips")
    spec("mixed_rgba", ("R", "G", "B", "A"), oiio.HALF, compression="zips",  # the binding won't group these
         formats=(oiio.TypeDesc("half"),) * 3 + (oiio.TypeDesc("float"),))
    return made


@pytest.mark.parametrize("name", ["half_zip", "float_layers", "dwaa", "luminance", "uint_channel", "tiled",
                                  "float_rgba", "mixed_rgba"])
def test_every_exr_reads_as_openimageio_decodes_it(tmp_path, name):
    path = exr_variants(tmp_path)[name]
    expected, channels = openimageio_read(path)
    image = read_image(path)
    assert image.channels == channels
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, expected)
    kept = read_image(path, half=True)  # half data stays half, float data float32; the values the same
    assert kept.channels == channels
    # Half stays half where the binding decodes it; OpenImageIO's path (tiles) always widens.
    assert kept.pixels.dtype == (np.float16 if name in ("half_zip", "dwaa") else np.float32)
    np.testing.assert_array_equal(kept.pixels.astype(np.float32), expected)


def test_rgb_and_rgba_plates_decode_straight_into_one_array(tmp_path):
    """RGB(A) plates of one type are decoded interleaved by the library (no planes to gather);
    mixed types are not, and go through the planes (the test above checks their pixels)."""
    from mlfarm.exr.io import _decode_interleaved

    made = exr_variants(tmp_path)
    for name, group, dtype in (("half_zip", "RGBA", np.float16), ("dwaa", "RGB", np.float16),
                               ("float_rgba", "RGBA", np.float32)):
        pixels = _decode_interleaved(made[name], group, (21, 37))
        assert pixels is not None and pixels.dtype == dtype and pixels.shape == (21, 37, len(group)), name
        np.testing.assert_array_equal(pixels.astype(np.float32), openimageio_read(made[name])[0])
    assert _decode_interleaved(made["mixed_rgba"], "RGBA", (21, 37)) is None


def test_frames_decoded_on_several_threads_at_once_are_each_whole(tmp_path):
    rng = np.random.default_rng(12)
    paths, frames = [], []
    for i in range(8):
        pixels = rng.uniform(0, 4, (64, 96, 4)).astype(np.float16)
        write_plate(tmp_path / f"t.{i}.exr", pixels, oiio.HALF)
        paths.append(str(tmp_path / f"t.{i}.exr"))
        frames.append(pixels.astype(np.float32))
    with ThreadPoolExecutor(4) as pool:
        images = list(pool.map(read_image, paths * 3))
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image.pixels, frames[i % 8])


@pytest.mark.parametrize("damage", ["cut", "zeroed"])
def test_damaged_pixel_data_is_an_error_never_partial_pixels(tmp_path, damage):
    rng = np.random.default_rng(13)
    write_plate(tmp_path / "good.exr", rng.uniform(0, 4, (64, 96, 4)).astype(np.float16), oiio.HALF)
    data = (tmp_path / "good.exr").read_bytes()
    if damage == "cut":
        data = data[: len(data) * 3 // 4]
    else:  # a run of zeros inside the last chunk's compressed data: the inflate fails
        data = data[:-200] + bytes(100) + data[-100:]
    bad = tmp_path / "bad.exr"
    bad.write_bytes(data)
    with pytest.raises(FrameError) as err:
        read_image(str(bad))
    assert str(err.value).startswith(f"{bad}: ")
    assert "missing or corrupted" in str(err.value)


def test_a_float_plate_keeps_values_half_cannot_hold(tmp_path):
    pixels = np.full((4, 5, 3), 1.0 + 2.0 ** -20, np.float32)  # not representable in half
    write_plate(tmp_path / "f.exr", pixels, oiio.FLOAT)
    image = read_image(str(tmp_path / "f.exr"))
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.rgba(3), pixels)


def test_all_half_planes_are_written_half_and_exact(tmp_path):
    rng = np.random.default_rng(4)
    rgba = rng.uniform(0, 8, (7, 11, 4)).astype(np.float16)
    ids = rng.integers(0, 1001, (7, 11)).astype(np.float16)  # ids up to max_detections stay exact
    matte = (ids > 0).astype(np.float16)
    pixels, names, data = assemble_planes(OUTPUTS, [rgba, matte, ids])
    assert pixels.dtype == np.float16 and data == [False] * 6
    write_exr(str(tmp_path / "o.exr"), tmp_path, pixels, names, data, {"mlfarm/frame": 1})
    assert set(formats_of(tmp_path / "o.exr").values()) == {"half"}
    back = read_image(str(tmp_path / "o.exr"))
    np.testing.assert_array_equal(back.rgba(4), rgba.astype(np.float32))
    np.testing.assert_array_equal(back.pixels[:, :, back.channels.index("instance.id")], ids.astype(np.float32))
    assert np.all(back.pixels[:, :, back.channels.index("instance.id")] <= 1000)


def test_float_data_planes_keep_full_precision_beside_half_rgba(tmp_path):
    rgba = np.ones((3, 4, 4), np.float16)
    ids = np.full((3, 4), 123457.0, np.float32)  # beyond half: must stay float
    pixels, names, data = assemble_planes(OUTPUTS, [rgba, (ids > 0).astype(np.float16), ids])
    assert pixels.dtype == np.float32
    write_exr(str(tmp_path / "m.exr"), tmp_path, pixels, names, data, {})
    fmts = formats_of(tmp_path / "m.exr")
    assert fmts["instance.id"] == "float" and fmts["R"] == "half" and fmts["matte.A"] == "half"
    back = read_image(str(tmp_path / "m.exr"))
    assert np.all(back.pixels[:, :, back.channels.index("instance.id")] == 123457.0)


@pytest.mark.parametrize("threads", [-1, 3])
def test_openexr_threads_follow_the_setting(threads):
    before = oiio.get_int_attribute("exr_threads")
    try:
        configure_openexr(threads)
        assert oiio.get_int_attribute("exr_threads") == threads
        configure_openexr(0)
        assert oiio.get_int_attribute("exr_threads") == len(os.sched_getaffinity(0))
    finally:
        oiio.attribute("exr_threads", before)


def test_planes_sliced_from_one_block_are_written_without_a_copy(tmp_path):
    rng = np.random.default_rng(5)
    block = rng.uniform(0, 4, (5, 6, 6)).astype(np.float16)
    pixels, names, _ = assemble_planes(OUTPUTS, [block[:, :, :4], block[:, :, 4], block[:, :, 5]])
    assert pixels is block and names == ["R", "G", "B", "A", "matte.A", "instance.id"]
    # Out of order, the planes are assembled in the declared order: a copy, with the right values.
    pixels, _, _ = assemble_planes(OUTPUTS, [block[:, :, :4], block[:, :, 5], block[:, :, 4]])
    assert not np.shares_memory(pixels, block)
    np.testing.assert_array_equal(pixels[:, :, 4], block[:, :, 5])
    np.testing.assert_array_equal(pixels[:, :, 5], block[:, :, 4])
    # A crop of the block is not the block.
    pixels, _, _ = assemble_planes(OUTPUTS, [block[:3, :, :4], block[:3, :, 4], block[:3, :, 5]])
    assert pixels.shape == (3, 6, 6) and not np.shares_memory(pixels, block)
    np.testing.assert_array_equal(pixels, block[:3])
    write_exr(str(tmp_path / "b.exr"), tmp_path, block, names, [False] * 6, {})
    back = read_image(str(tmp_path / "b.exr"))
    np.testing.assert_array_equal(back.pixels[:, :, back.channels.index("instance.id")], block[:, :, 5])


def test_a_view_of_adjacent_channels_is_not_copied(tmp_path):
    pixels = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    write_plate(tmp_path / "v.exr", pixels, oiio.HALF)
    image = read_image(str(tmp_path / "v.exr"))
    rgb = image.rgba(3, view=True)
    assert np.shares_memory(rgb, image.pixels)
    np.testing.assert_array_equal(rgb, pixels[:, :, :3])
    assert not np.shares_memory(image.rgba(3), image.pixels)


def test_worker_io_threads_yield_to_the_gpu_thread_and_size_themselves(tmp_path):
    import threading

    from mlfarm.settings import Settings
    from mlfarm.worker.lanes import io_threads, start_io

    before = oiio.get_int_attribute("exr_threads")
    settings = Settings(io_nice=3, exr_threads=2, storage_root=tmp_path, data_dir=tmp_path)
    pool = start_io(settings)
    try:
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        assert theirs == min(19, mine + 3) and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
        assert oiio.get_int_attribute("exr_threads") == 2
    finally:
        pool.shutdown()
        oiio.attribute("exr_threads", before)
    assert io_threads(settings) == max(2, len(os.sched_getaffinity(0)))
    assert io_threads(Settings(io_threads=7, storage_root=tmp_path, data_dir=tmp_path)) == 7


@pytest.mark.parametrize("compression", ["zip", "rle", "piz", "none", "dwaa"])
def test_outputs_use_the_configured_compression(tmp_path, compression):
    """Every compression the setting accepts gives a file OpenImageIO (as Nuke) reads back, with
    lossless ones bit-exact and the mlfarm metadata in the header with its types."""
    rng = np.random.default_rng(3)
    pixels = rng.random((24, 40, 5), dtype=np.float32)
    names = ["R", "G", "B", "A", "instance.id"]
    pixels[:, :, 4] = rng.integers(0, 9, (24, 40))
    path = str(tmp_path / "o.0001.exr")
    write_exr(path, tmp_path, pixels, names, [False] * 4 + [True], {"mlfarm/frame": 1, "mlfarm/job": "j1"},
              compression)
    inp = oiio.ImageInput.open(path)
    spec = inp.spec()
    got = inp.read_image(0, 0, 0, spec.nchannels, "float")
    inp.close()
    assert spec.getattribute("compression") == compression
    assert spec.getattribute("mlfarm/frame") == 1 and spec.getattribute("mlfarm/job") == "j1"
    assert [str(f) for f in spec.channelformats] == ["half"] * 4 + ["float"]
    order = [list(spec.channelnames).index(n) for n in names]
    np.testing.assert_array_equal(got[:, :, order[4]], pixels[:, :, 4])  # data planes stay exact, even with dwaa
    expected = pixels[:, :, :4].astype(np.float16).astype(np.float32)
    if compression == "dwaa":
        np.testing.assert_allclose(got[:, :, order[:4]], expected, atol=0.05)
    else:
        np.testing.assert_array_equal(got[:, :, order[:4]], expected)


def test_an_unknown_compression_is_refused_by_the_settings(tmp_path):
    with pytest.raises(ValueError, match="exr_compression"):
        Settings(exr_compression="zip9", storage_root=tmp_path, data_dir=tmp_path)


def test_every_compression_the_settings_accept_can_be_written(tmp_path):
    import typing

    names = typing.get_args(Settings.model_fields["exr_compression"].annotation)
    pixels = np.full((8, 8, 1), 0.25, np.float32)
    for name in names:  # a name added to the settings but not to the writer fails here, not on the farm
        write_exr(str(tmp_path / f"{name}.exr"), tmp_path, pixels, ["Y"], [False], {}, name)
        assert read_image(str(tmp_path / f"{name}.exr")).pixels[0, 0, 0] == 0.25, name
    assert len(names) == 10
