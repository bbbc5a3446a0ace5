"""Reading frames (EXRs through OpenEXR's bindings, any other format through OpenImageIO), writing
EXRs with OpenEXR.

EXR stores channels sorted by name, so channels are always found by name, never by position.
Outputs use the names Nuke itself writes: the first output plane is the main ``rgba`` layer
(``R``, ``G``, ``B``, ``A``), every other plane is ``layer.channel``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import OpenEXR
import OpenImageIO as oiio

from mlfarm.cpus import available_cpus
from mlfarm.storage import atomic_output
from mlfarm.tensors import is_tensor

from .common import FrameError, header_value, write_failure

log = logging.getLogger(__name__)

RGBA = ("R", "G", "B", "A")
_ALIASES = {
    "R": ("r", "red", "rgba.r", "rgba.red"),
    "G": ("g", "green", "rgba.g", "rgba.green"),
    "B": ("b", "blue", "rgba.b", "rgba.blue"),
    "A": ("a", "alpha", "rgba.a", "rgba.alpha"),
}


@dataclass
class Image:
    # H x W x C float32 (float16 where ``read_image(half=True)`` kept it), top row first; a tensor on
    # the device where ``read_image(device=...)`` decoded it there.
    pixels: Any
    channels: list[str]

    def rgba(self, max_channels: int, view: bool = False) -> np.ndarray:
        """Up to ``max_channels`` of R, G, B, A in that order (by name), or a lone luminance.

        With ``view``, channels that lie side by side in the file come as a strided view of the
        pixels instead of a contiguous copy (for a caller that copies them anyway).
        """
        lower = [c.lower() for c in self.channels]
        picked = []
        for canonical in RGBA:
            for alias in _ALIASES[canonical]:
                if alias in lower:
                    picked.append(lower.index(alias))
                    break
        if not picked:
            for alias in ("y", "rgba.y"):
                if alias in lower:
                    picked = [lower.index(alias)]
        if not picked:
            raise FrameError(f"no R, G, B, A or Y channel among {', '.join(self.channels)}")
        picked = picked[:max_channels]
        if picked == list(range(len(picked))) and len(picked) == self.pixels.shape[2]:
            return self.pixels
        if view and picked == list(range(picked[0], picked[0] + len(picked))):
            return self.pixels[:, :, picked[0]:picked[0] + len(picked)]
        chosen = self.pixels[:, :, picked]
        return chosen if is_tensor(chosen) else np.ascontiguousarray(chosen)


def configure_openexr(threads: int) -> None:
    """Size OpenImageIO's OpenEXR thread pool for this process (``Settings.exr_threads``).

    It decodes the EXRs ``read_image`` leaves to OpenImageIO (tiled, deep, several parts, integer
    channels); plain scanline plates are decoded by OpenEXR's binding on the reading thread, and
    outputs are written through OpenEXR's bindings, each on the I/O thread that writes it. Every
    file's chunks go to one process-wide pool, so a worker whose I/O threads already read several frames at once may do
    better with none (-1): each thread then decodes its own frame. 0 means one pool thread per
    core this process may run on (OpenImageIO's own default counts every core of the host, also
    those a pinned worker may not use).
    """
    oiio.attribute("exr_threads", int(threads) if threads else len(available_cpus()))


def read_image(path: str, max_values: int = 1 << 30, half: bool = False, device: Any = None) -> Image:
    """Read a whole frame as float32 (or as stored half, see ``half``); any damage in the file is an
    error, never partial pixels.

    OpenImageIO reads the header (every format, and the checks below). A plain EXR (one part,
    scanlines, half or float channels) is then decoded by OpenEXR's own binding, which lets go of the
    GIL while it inflates: a worker's I/O threads decode frames side by side, where OpenImageIO's
    binding read no faster on two threads than on one (``benchmarks/bench_read.py``). Anything
    else (other formats, tiled, deep, several parts, integer channels) is decoded by OpenImageIO.

    ``half``: a plain EXR stored as half stays half (a model that converts on its GPU uploads half the
    bytes and spares the host the conversion); float data, and what OpenImageIO decodes, is float32.

    ``device``: a CUDA device where a plain EXR compressed with zip, zips or nothing may be decoded
    (``gpu_read``): the pixels are then a tensor there, ready when this returns. Other files, and
    any device where nvCOMP cannot, decode on the host as above.
    """
    if not os.path.exists(path):
        raise FrameError(f"{path}: file not found")
    inp = oiio.ImageInput.open(path)
    if inp is None:
        raise FrameError(f"{path}: {oiio.geterror() or 'not a readable image'}")
    pixels: Any = None
    try:
        spec = inp.spec()
        values = spec.width * spec.height * max(1, spec.nchannels)
        if spec.width <= 0 or spec.height <= 0 or values > max_values:
            raise FrameError(f"{path}: refusing an image of {spec.width}x{spec.height}x{spec.nchannels}")
        channels = list(spec.channelnames)
        plain = _plain_exr(inp, spec)
        if not plain:
            pixels = inp.read_image(0, 0, 0, spec.nchannels, "float")
            err = inp.geterror()
            if pixels is None or err:
                raise FrameError(f"{path}: {err or 'could not read pixels'}")
    finally:
        inp.close()
    shape = (spec.height, spec.width)
    if plain and device is not None and str(device).startswith("cuda"):
        pixels = _decode_on_device(path, channels, shape, half, device)
        if pixels is not None and not isinstance(pixels, np.ndarray):
            return Image(pixels=pixels, channels=channels)
    if plain and pixels is None:
        pixels = _decode_exr(path, channels, shape, half)
    pixels = np.asarray(pixels)
    if pixels.dtype != np.float16:  # float16 only where ``half`` kept it
        pixels = pixels.astype(np.float32, copy=False)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return Image(pixels=pixels, channels=channels)


def _plain_exr(inp: Any, spec: Any) -> bool:
    """An EXR OpenEXR's binding decodes here: one scanline part of half or float channels."""
    if inp.format_name() != "openexr" or spec.deep or spec.tile_width:
        return False
    formats = list(spec.channelformats) or [spec.format] * spec.nchannels
    if any(f.basetype not in (oiio.HALF, oiio.FLOAT) for f in formats):
        return False
    return not inp.seek_subimage(1, 0)  # a second part: OpenImageIO reads the first, as before


_device_decode = {"broken": False}  # nvCOMP failed on a file the host then decoded: decode on the host from then on


def _decode_on_device(path: str, channels: Sequence[str], shape: tuple[int, int], half: bool, device: Any) -> Any:
    """The pixels decoded on a CUDA ``device``, as a tensor there (``gpu_read``); None where the file is
    not one it decodes (the host then does).

    Where decoding there fails, the host decodes the file: a damaged file fails as it would have
    anyway (FrameError), but a file the host reads whole means the device's decoding is at fault
    (nvCOMP, a driver): the host's pixels (numpy) are returned, a warning logged, and the process
    decodes on the host from then on, so a fault there never fails good frames.
    """
    if _device_decode["broken"]:
        return None
    import torch

    from . import gpu_read
    from .gpu import thread_stream

    try:
        file = gpu_read.read_file(torch, path, pin=True)
        lay = gpu_read.layout(file.numpy())
        if lay is None or (lay.height, lay.width) != shape:
            return None
        stream = thread_stream(torch)
        pixels = gpu_read.decode(torch, file, lay, channels, device, half)
        done = torch.cuda.Event(blocking=True)  # wait without holding the GIL
        done.record(stream)
        done.synchronize()
        gpu_read.check()
        return pixels
    except Exception as exc:
        error = exc
    host = _decode_exr(path, channels, shape, half)  # raises where the file is damaged
    log.warning("decoding plates on %s failed on %s (%s), which the host decoded: decoding plates on the host from "
                "now on", device, path, error, exc_info=error)
    _device_decode["broken"] = True
    return host


def _decode_exr(path: str, channels: Sequence[str], shape: tuple[int, int], half: bool) -> np.ndarray:
    """The pixels of a plain EXR, channels in ``channels``' order (OpenImageIO's, as the header read gave)."""
    if list(channels) in (["R", "G", "B"], ["R", "G", "B", "A"]):
        pixels = _decode_interleaved(path, "".join(channels), shape)
        if pixels is not None:
            if pixels.dtype == np.float16 and not half:
                pixels = pixels.astype(np.float32)
            return pixels
    try:
        with OpenEXR.File(path, separate_channels=True) as exr:
            planes = {name: ch.pixels for name, ch in exr.channels().items()}
    except Exception:  # the binding drops a part it cannot decode, then fails on the missing part
        raise _damaged(path) from None
    missing = [c for c in channels if c not in planes or planes[c].shape != shape]
    if missing:
        raise FrameError(f"{path}: channels {', '.join(missing)} could not be decoded as the header describes")
    keep = half and all(planes[c].dtype == np.float16 for c in channels)
    out = np.empty((*shape, len(channels)), dtype=np.float16 if keep else np.float32)
    for i, name in enumerate(channels):
        out[..., i] = planes[name]
    return out


def _damaged(path: str) -> FrameError:
    return FrameError(f"{path}: damaged or cut short: some scanline chunks were missing or corrupted")


def _decode_interleaved(path: str, group: str, shape: tuple[int, int]) -> np.ndarray | None:
    """An RGB or RGBA plate (``group``) decoded straight into one H x W x C array, as stored (half or
    float): the library lays the channels side by side as it decodes, where filling an interleaved
    array from separate planes took a quarter of a grainy 1080p frame's read (45 against 60 ms of a
    core on the 2-core machine; 62 against 71 ms of a thread on 16 threads of an H100 host,
    ``benchmarks/bench_read.py``). None where the binding will not group them (channels of mixed
    types): the caller then decodes them one by one."""
    try:
        with OpenEXR.File(path, separate_channels=False) as exr:
            planes = {name: ch.pixels for name, ch in exr.channels().items()}
    except Exception as exc:
        if isinstance(exc, ValueError) and "coalesce" in str(exc):
            return None
        raise _damaged(path) from None
    pixels = planes.get(group)
    if len(planes) != 1 or pixels is None or pixels.shape != (*shape, len(group)):
        return None
    return pixels


def channel_names(layer: str, spec: int | Sequence[str], n: int, main: bool) -> list[str]:
    """EXR channel names for one output plane of ``n`` channels."""
    if isinstance(spec, int):
        names = list(RGBA[:n]) if n <= 4 else [f"c{i}" for i in range(n)]
    else:
        names = list(spec)
        if len(names) != n:
            raise FrameError(f"output plane {layer} declares channels {names} but the model returned {n}")
    return names if main else [f"{layer}.{c}" for c in names]


def read_planes(path: str, outputs: Mapping[str, int | Sequence[str]]) -> dict[str, np.ndarray]:
    """The planes of an output EXR as ``write_planes`` laid them out: plane name -> H x W x C float32.

    How a sequence that resumes reads back the state a model wrote on the frame before.
    """
    image = read_image(path)
    index = {c: i for i, c in enumerate(image.channels)}
    out = {}
    for i, (layer, spec) in enumerate(outputs.items()):
        n = spec if isinstance(spec, int) else len(spec)
        names = channel_names(layer, spec, n, main=(i == 0))
        missing = [c for c in names if c not in index]
        if missing:
            raise FrameError(f"{path}: no channel {', '.join(missing)} (plane {layer})")
        out[layer] = np.ascontiguousarray(image.pixels[:, :, [index[c] for c in names]], dtype=np.float32)
    return out


def _planes(outputs: Mapping[str, int | Sequence[str]], images: Sequence[Any]
            ) -> Iterator[tuple[int, Any, list[str]]]:
    """Each declared output plane as (index, H x W x C image, EXR channel names), checked: as many
    images as planes, all of one size. Works on numpy arrays and torch tensors alike."""
    if len(images) < len(outputs):
        raise FrameError(f"the model returned {len(images)} images for {len(outputs)} output planes")
    shape = None
    for i, (layer, spec) in enumerate(outputs.items()):
        img = images[i]
        if img.ndim == 2:
            img = img[:, :, None]
        if shape is None:
            shape = tuple(img.shape[:2])
        elif tuple(img.shape[:2]) != shape:
            raise FrameError(f"output plane {layer} is {img.shape[1]}x{img.shape[0]}, not {shape[1]}x{shape[0]}")
        yield i, img, channel_names(layer, spec, img.shape[2], main=(i == 0))


def assemble_planes(outputs: Mapping[str, int | Sequence[str]], images: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, list[str], list[bool]]:
    """Stack a model's output images into one EXR's pixels, channel names and float-ness.

    The first declared plane becomes the main layer; data planes (all others) are kept in float
    so ids and mattes stay exact, unless the model returns a plane as float16: then it is written
    as half (exact for integers up to 2048). When every plane arrives as float16 the pixels stay
    float16, so nothing is converted at all.
    Planes that are consecutive channel slices of one array (in order) are not copied either.
    """
    images = list(images[:len(outputs)])
    dtype = np.float16 if all(getattr(im, "dtype", None) == np.float16 for im in images) else np.float32
    arrays, names, is_data = [], [], []
    for i, img, plane_names in _planes(outputs, [np.asarray(im) for im in images]):
        arrays.append(img.astype(dtype, copy=False))
        names.extend(plane_names)
        is_data.extend([i != 0 and img.dtype != np.float16] * len(plane_names))
    block = _one_block(images, len(names))
    return (block if block is not None else np.concatenate(arrays, axis=2)), names, is_data


def _one_block(images: Sequence[np.ndarray], channels: int) -> np.ndarray | None:
    """The H x W x ``channels`` C-contiguous array whose consecutive channels ``images`` are, if any."""
    first = images[0]
    base = first if first.base is None else first.base
    if (not isinstance(base, np.ndarray) or base.ndim != 3 or base.shape[2] != channels
            or not base.flags.c_contiguous or base.dtype != first.dtype):
        return None
    at = base.__array_interface__["data"][0]
    for img in images:
        if (img is not base and img.base is not base) or img.dtype != base.dtype or img.ndim not in (2, 3):
            return None
        if (img.__array_interface__["data"][0] != at or img.shape[:2] != base.shape[:2]
                or img.strides[:2] != base.strides[:2]):
            return None
        n = 1 if img.ndim == 2 else img.shape[2]
        if n > 1 and img.strides[2] != base.itemsize:
            return None
        at += n * base.itemsize
    return base


# Settings.exr_compression's names (OpenImageIO's and Nuke's) to OpenEXR's.
_COMPRESSIONS = {"none": OpenEXR.NO_COMPRESSION, "rle": OpenEXR.RLE_COMPRESSION, "zips": OpenEXR.ZIPS_COMPRESSION,
                 "zip": OpenEXR.ZIP_COMPRESSION, "piz": OpenEXR.PIZ_COMPRESSION, "pxr24": OpenEXR.PXR24_COMPRESSION,
                 "b44": OpenEXR.B44_COMPRESSION, "b44a": OpenEXR.B44A_COMPRESSION, "dwaa": OpenEXR.DWAA_COMPRESSION,
                 "dwab": OpenEXR.DWAB_COMPRESSION}


def _header(metadata: Mapping[str, Any], compression: str) -> dict[str, Any]:
    if compression not in _COMPRESSIONS:
        raise FrameError(f"unknown EXR compression {compression!r}; use one of {', '.join(_COMPRESSIONS)}")
    header: dict[str, Any] = {"type": OpenEXR.scanlineimage, "compression": _COMPRESSIONS[compression]}
    header.update((key, header_value(value)) for key, value in metadata.items())
    return header


def write_planes(path: str, root: str | os.PathLike[str], outputs: Mapping[str, int | Sequence[str]],
                 images: Sequence[Any], metadata: Mapping[str, Any], compression: str = "zip",
                 rgba_half: bool = True, gpu_compress: bool = True) -> None:
    """Write a model's output images as one EXR: numpy arrays, or torch tensors on any device.

    Planes still on a CUDA device are compressed there when the settings allow it (ZIPS through
    nvCOMP, mlfarm/exr/gpu.py), so the worker's cores never encode them; otherwise they come to
    the host and OpenEXR writes them, as numpy planes always are.
    """
    cuda = next((im.device for im in images if is_tensor(im) and im.device.type == "cuda"), None)
    if cuda is not None:
        from . import gpu as gpu_exr

        if gpu_exr.can_encode(compression, gpu_compress, str(cuda)):
            channels = device_channels(outputs, images, rgba_half)
            if sum(t.shape[1] * t.element_size() for _, t in channels) <= gpu_exr.MAX_LINE_BYTES:
                gpu_exr.write_zips(path, root, channels, metadata)
                return
    images = [im.cpu().numpy() if is_tensor(im) else im for im in images]
    pixels, names, data = assemble_planes(outputs, images)
    write_exr(path, root, pixels, names, data, metadata, compression, rgba_half)


def device_channels(outputs: Mapping[str, int | Sequence[str]], images: Sequence[Any], rgba_half: bool
                    ) -> list[tuple[str, Any]]:
    """The EXR channels of output tensors as (name, H x W tensor) in the types ``write_exr`` gives
    them: with ``rgba_half`` the main plane half and data planes float unless they are half; all
    float without it."""
    import torch

    device = next(im.device for im in images if is_tensor(im))

    def on_device(im: Any) -> Any:
        t = im if is_tensor(im) else torch.from_numpy(np.asarray(im))
        return t if t.device == device else t.to(device)

    # Conversions only where needed: on a GPU worker each tensor operation hands the GIL over.
    channels: list[tuple[str, Any]] = []
    for i, img, names in _planes(outputs, [on_device(im) for im in images[:len(outputs)]]):
        half = rgba_half and (i == 0 or img.dtype == torch.float16)  # as write_exr's data_channels
        dtype = torch.float16 if half else torch.float32
        for c, name in enumerate(names):
            plane = img[:, :, c]
            channels.append((name, plane if plane.dtype == dtype else plane.to(dtype)))
    return channels


def write_exr(path: str, root: str | os.PathLike[str], pixels: np.ndarray, channels: Sequence[str],
              data_channels: Sequence[bool], metadata: Mapping[str, Any], compression: str = "zip",
              rgba_half: bool = True) -> None:
    """Write an EXR atomically under the storage root, with mlfarm's header metadata.

    Written through OpenEXR's own Python bindings, one contiguous array per channel: the same file
    as through OpenImageIO for 20-40% less CPU a frame (benchmarks/bench_exr_planes.py), which is
    what a GPU worker runs short of. Each call encodes on its own thread, releasing the GIL, so the
    worker's I/O threads write frames in parallel.
    """
    planes = {name: np.ascontiguousarray(pixels[:, :, i], np.float32 if data or not rgba_half else np.float16)
              for i, (name, data) in enumerate(zip(channels, data_channels, strict=True))}
    header = _header(metadata, compression)
    nbytes = sum(p.nbytes for p in planes.values())
    with atomic_output(path, root) as tmp:
        try:
            with OpenEXR.File(header, planes) as exr:
                exr.write(os.fspath(tmp))
        except Exception as exc:  # OpenEXR raises RuntimeError (and others) with the library's message
            raise FrameError(f"{path}: {write_failure(str(exc) or type(exc).__name__, tmp, nbytes)}") from None
        if _space_was_short(tmp, nbytes):
            _check_complete(path, tmp, nbytes)


def _space_was_short(tmp: os.PathLike[str], nbytes: int) -> bool:
    """Whether the disk may have filled up while this file was written.

    Only then can OpenEXR have swallowed a failed write (see _check_complete). A network file
    system reports such failures at the fsync before the rename instead; a local one has accurate
    free space. One statvfs instead of reopening every file we write.
    """
    try:
        st = os.statvfs(os.path.dirname(os.fspath(tmp)))
    except OSError:
        return True
    return st.f_bavail * st.f_frsize < 4 * nbytes + (64 << 20)


def _check_complete(path: str, tmp: os.PathLike[str], nbytes: int) -> None:
    """Read the written file's last scanline back before it is renamed into place.

    OpenEXR writes chunks in order and the offset table last; on a full disk it can report success
    for a file whose tail never reached the disk (seen here: 1 in 40 writes to a full tmpfs).
    Decoding the last chunk catches that for the price of one chunk, so a truncated EXR is never
    published under the output name.
    """
    inp = oiio.ImageInput.open(os.fspath(tmp))
    ok = inp is not None
    if ok:
        spec = inp.spec()
        ok = inp.read_scanline(spec.y + spec.height - 1, 0, "float") is not None and not inp.geterror()
        inp.close()
    if not ok:
        raise FrameError(f"{path}: {write_failure('the written file is incomplete', tmp, nbytes)}")


def sidecar_path(frame_file: str) -> str:
    """The JSON file that travels beside one output frame: ``shot.1001.exr`` -> ``shot.1001.json``."""
    return os.path.splitext(frame_file)[0] + ".json"


def write_json(path: str, root: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically under the storage root (a reader never sees half a file)."""
    text = json.dumps(data, sort_keys=True, indent=1, default=str)
    with atomic_output(path, root) as tmp:
        tmp.write_text(text, encoding="utf-8")
