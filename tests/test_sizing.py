"""How a worker sizes its pools from its cores (worker/sizing.py): the plan, and a real worker on it."""

from __future__ import annotations

import json
import os

import OpenImageIO as oiio
import pytest

from mlfarm.frames import frame_path
from mlfarm.settings import Settings
from mlfarm.worker.sizing import GPU_TASKS, plan, plan_for

from conftest import make_plate


@pytest.mark.parametrize("cores", [1, 2, 4, 16, 64])
def test_a_cpu_worker_never_runs_more_busy_threads_than_its_cores(cores):
    p = plan(cores, "cpu")
    assert (p.cores, p.device, p.tasks) == (cores, "cpu", 1 if cores == 1 else 2)
    assert p.tasks * p.torch_threads == cores  # two chunks' batches side by side fill the cores, no more
    assert p.interop_threads == 1
    assert p.exr_threads == -1  # each I/O thread decodes its own frame: no pool beside torch's
    assert p.io_threads == 2
    assert "CPU worker" in p.why and "set explicitly" not in p.why


@pytest.mark.parametrize("cores", [1, 2, 4, 16, 64])
def test_a_gpu_worker_keeps_what_was_measured_good_on_gpus(cores):
    p = plan(cores, "cuda")
    assert (p.cores, p.device, p.tasks) == (cores, "cuda", GPU_TASKS) and GPU_TASKS == 3
    assert p.io_threads == max(2, cores)  # an I/O thread a core, niced
    assert p.torch_threads == p.interop_threads == p.exr_threads == cores
    assert "GPU worker" in p.why


def test_prefork_children_share_the_cores_and_take_one_task_each():
    p = plan(16, "cpu", processes=4)
    assert (p.cores, p.tasks, p.torch_threads) == (4, 1, 4)
    assert plan(16, "cuda", processes=4).tasks == 1
    assert plan(2, "cpu", processes=4).torch_threads == 1  # never less than one core
    assert plan(16, "cpu", processes=4, tasks=3).tasks == 1  # a prefork child takes one at a time
    assert "prefork" in p.why


def test_explicit_settings_override_each_choice_and_the_plan_says_so():
    p = plan(2, "cpu", tasks=3, io_threads=5, torch_threads=7, exr_threads=4)
    assert (p.tasks, p.io_threads, p.torch_threads, p.exr_threads) == (3, 5, 7, 4)
    assert p.interop_threads == 1
    assert "set explicitly: tasks=3, io_threads=5, torch_threads=7, exr_threads=4" in p.why
    assert plan(16, "cuda", exr_threads=-1).exr_threads == -1
    assert plan(16, "cuda", torch_threads=2).interop_threads == 2  # never more inter-op than intra-op threads
    only_io = plan(8, "cuda", io_threads=1)
    assert (only_io.io_threads, only_io.tasks, only_io.torch_threads) == (1, 3, 8)
    assert only_io.why.endswith("set explicitly: io_threads=1")


def test_the_plan_reads_the_settings_and_describes_itself_in_one_line(tmp_path):
    settings = Settings(storage_root=tmp_path, data_dir=tmp_path, worker_threads=2, torch_threads=1)
    p = plan_for(settings, "cpu", cores=4)
    assert (p.cores, p.tasks, p.torch_threads, p.io_threads, p.exr_threads) == (4, 2, 1, 2, -1)
    line = p.describe()
    assert "\n" not in line
    assert line.startswith("sized for 4 cores (cpu): 2 tasks in flight, 2 I/O threads, torch 1 intra-op / "
                           "1 inter-op threads, OpenEXR no threads; CPU worker")
    assert plan_for(Settings(storage_root=tmp_path, data_dir=tmp_path), "cpu").cores == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        plan(4, "mps")


def _reported(path: str) -> dict:
    return json.loads(oiio.ImageInput.open(path).spec().getattribute("mlfarm/objects"))[0]


@pytest.mark.parametrize("overrides", [{}, {"MLFARM_TORCH_THREADS": "1", "MLFARM_WORKER_THREADS": "2",
                                            "MLFARM_EXR_THREADS": "3"}])
def test_a_real_worker_states_its_plan_first_and_runs_torch_on_it(farm, overrides):
    farm.env_overrides.update(overrides)
    worker = farm.start_worker()
    cores = len(os.sched_getaffinity(0))
    expected = plan(cores, "cpu", tasks=int(overrides.get("MLFARM_WORKER_THREADS", 0)),
                    torch_threads=int(overrides.get("MLFARM_TORCH_THREADS", 0)),
                    exr_threads=int(overrides.get("MLFARM_EXR_THREADS", 0)))
    lines = [line for line in worker.log().splitlines() if " INFO " in line or " WARNING " in line]
    assert lines and f"worker {worker.name} {expected.describe()}" in lines[0], lines[:3]
    if overrides:
        assert "set explicitly: tasks=2, torch_threads=1, exr_threads=3" in lines[0]

    frames = [1, 2]
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    status = farm.wait_job(farm.farm().submit("threads", plate, out, frames, chunk=2).id)
    assert status.counts["done"] == 2, status.summary()
    for f in frames:
        seen = _reported(frame_path(out, f))
        assert seen["torch_threads"] == expected.torch_threads, seen
        assert seen["interop_threads"] == expected.interop_threads, seen
        assert seen["omp_num_threads"] == str(expected.torch_threads), seen
        assert seen["exr_threads"] == expected.exr_threads, seen
