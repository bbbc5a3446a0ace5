"""nvCOMP's working memory from mlfarm's pools (mlfarm/exr/nvcomp_memory.py).

The pinned pool's rule (a buffer is lent again only once its stream's work is done) is tested here
with torch CPU tensors and events whose completion the test controls; with a GPU, the real pools
under nvCOMP's decode and encode: warm pools make no new pinned buffers, and pixels stay exact.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from mlfarm.exr import nvcomp_memory
from mlfarm.exr.nvcomp_memory import Borrowed, PinnedPool, size_class


class Done:
    """An event the test finishes by hand."""

    def __init__(self) -> None:
        self.finished = False

    def query(self) -> bool:
        return self.finished


def pool_with_events() -> tuple[PinnedPool, list[Done]]:
    events: list[Done] = []

    def event(stream):
        events.append(Done())
        return events[-1]

    return PinnedPool(lambda n: torch.empty(n, dtype=torch.uint8), lambda: "stream", event), events


def test_size_classes():
    assert size_class(1) == 4096
    assert size_class(4096) == 4096
    assert size_class(4097) == 8192
    assert size_class(3 << 20) == 4 << 20


def test_a_buffer_is_lent_again_only_once_its_work_is_done():
    pool, events = pool_with_events()
    first = pool.take(5000, "stream")
    address = first.ptr
    del first  # nvCOMP let go; its copy may still be queued on the stream
    assert len(events) == 1
    second = pool.take(6000, "stream")  # same size class, but the work is not done: a new buffer
    assert second.ptr != address and pool.made == 2
    events[0].finished = True
    third = pool.take(7000, "stream")
    assert third.ptr == address and pool.made == 2  # reused
    del second, third
    assert pool.lent == 3


def test_sizes_do_not_mix():
    pool, events = pool_with_events()
    small = pool.take(100, "s")
    del small
    events[0].finished = True
    big = pool.take(1 << 20, "s")
    assert pool.made == 2  # a 4 KiB buffer does not serve a 1 MiB request
    assert int(big.ptr) != 0


def test_borrowed_gives_back_once():
    calls = []
    b = Borrowed(123, lambda: calls.append(1))
    b.__del__()
    del b
    gc.collect()
    assert calls == [1]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and nvCOMP")


@gpu
def test_warm_pools_make_no_new_pinned_buffers(tmp_path):
    from mlfarm.exr import gpu as gpu_exr
    from mlfarm.exr.io import read_image

    if not gpu_exr.nvcomp_available():
        pytest.skip("nvCOMP is not installed")
    from test_gpu_read import plate, write  # a sibling test module's plate writer

    path = write(tmp_path / "p.0001.exr", ("R", "G", "B", "A"), ("half",) * 4, "zips", plate(1080, 1920, 4, 3))
    host = read_image(path, half=True).pixels
    for _ in range(3):  # warm
        read_image(path, half=True, device="cuda")
    before = nvcomp_memory.stats()
    for _ in range(10):
        device = read_image(path, half=True, device="cuda").pixels
        planes = [("Z", device[..., 0].float())]
        gpu_exr.write_zips(str(tmp_path / "out.exr"), tmp_path, planes, {})
    after = nvcomp_memory.stats()
    assert after["pinned_lent"] > before["pinned_lent"]  # nvCOMP took its memory from the pools
    assert after["pinned_made"] - before["pinned_made"] <= 2
    assert np.array_equal(device.cpu().numpy(), host)


@gpu
def test_a_process_that_used_the_pools_exits_cleanly(tmp_path):
    """nvCOMP keeps the allocators in C++ statics: without ``_uninstall`` at exit, every such process
    ended with a segmentation fault after its work was done."""
    import subprocess
    import sys

    from mlfarm.exr import gpu as gpu_exr

    if not gpu_exr.nvcomp_available():
        pytest.skip("nvCOMP is not installed")
    from test_gpu_read import plate, write

    path = write(tmp_path / "p.exr", ("R", "G", "B", "A"), ("half",) * 4, "zips", plate(64, 128, 4, 1))
    script = ("import sys, torch; from mlfarm.exr import gpu, nvcomp_memory; from mlfarm.exr.io import read_image\n"
              "p = read_image(sys.argv[1], half=True, device='cuda').pixels\n"
              "gpu.write_zips(sys.argv[2], sys.argv[3], [('Z', p[..., 0].float())], {})\n"
              "assert nvcomp_memory.stats()['pinned_lent'] > 0\n")
    done = subprocess.run([sys.executable, "-c", script, path, str(tmp_path / "o.exr"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
