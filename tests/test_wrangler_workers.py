"""Wrangler controls (#24) on a real farm: bad workers, `mlfarm workers`, tags and requirements.

The ``flaky`` test model raises a CUDA-looking error on every frame in a worker started with
FLAKY_BROKEN=infer (its worker is broken, not the frames); ``bigmem`` declares ``requires``.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from mlfarm.broker.requirements import (
    RequirementError,
    canonical,
    normalise,
    queue_for,
    satisfied,
    split_queue,
)
from mlfarm.frames import frame_path
from mlfarm.worker.nodes import default_tags, memory_class, model_tag

from conftest import make_plate


def corrupt(path: str) -> None:
    """Keep the EXR header, cut the pixel data (as tests/test_farm_jobs.py does)."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


BROKEN = "CUDA error: an illegal memory access was encountered (tests)"


# --- units: requirements and tags -------------------------------------------------------------
def test_requirements_match_tags_and_numeric_facts():
    assert normalise(" 80GB,h200, GPU_memory_gb >= 24.0 ,h200") == ["80gb", "gpu_memory_gb>=24", "h200"]
    assert normalise(None) == [] and normalise(["", " "]) == []
    assert canonical("cores<8.50") == "cores<8.5"
    facts = {"gpu_memory_gb": 79.6, "cores": 16}
    assert satisfied(["gpu_memory_gb>=24", "h100"], ["80gb", "h100", "gpu"], facts)
    assert not satisfied(["gpu_memory_gb>=80"], ["80gb"], facts)  # 79.6 GiB: the class is a tag, not the number
    assert not satisfied(["h200"], ["80gb", "h100"], facts)
    assert satisfied(["cores>8", "cores!=12", "cores<=16", "cores==16"], [], facts)
    assert not satisfied(["gpu_memory_gb>=24"], ["cpu"], {"gpu_memory_gb": 0})
    assert not satisfied(["vram_gb>1"], ["gpu"], facts)  # a fact the worker does not have is not met
    assert satisfied([], [], {})
    assert queue_for("gpu", ["h200", "80gb", "h200"]) == "gpu@80gb+h200"
    assert queue_for("gpu", []) == "gpu"
    assert split_queue("gpu@80gb+gpu_memory_gb>=24") == ("gpu", ["80gb", "gpu_memory_gb>=24"])
    assert split_queue("cpu") == ("cpu", [])
    for bad in ("80 gb", "gpu@x", "a+b", "mem>=lots", "x:y"):
        with pytest.raises(RequirementError, match="neither a tag"):
            normalise([bad])


def test_default_tags_come_from_the_gpu():
    gib = 2**30
    assert default_tags("NVIDIA H100 80GB HBM3", int(79.6 * gib)) == ["80gb", "gpu", "h100"]
    assert default_tags("NVIDIA H200", int(139.8 * gib)) == ["141gb", "gpu", "h200"]
    assert default_tags("NVIDIA GeForce RTX 4090", int(23.99 * gib)) == ["24gb", "gpu", "rtx4090"]
    assert default_tags("", 0) == ["cpu"]
    assert model_tag("NVIDIA A100-SXM4-40GB") == "a100"
    assert model_tag("Tesla V100-SXM2-16GB") == "v100"
    assert model_tag("NVIDIA L40S") == "l40s"
    assert model_tag("Some Accelerator") == ""
    assert memory_class(22.5) == "24gb"  # an A10 reports 22.5 GiB of its 24 GB
    assert memory_class(44.99) == "48gb"
    assert memory_class(500) == "500gb"


def test_a_worker_describes_its_gpu_from_nvidia_smi_and_takes_given_tags(monkeypatch, tmp_path):
    """nvidia-smi's answer on an H200 (as measured on one), parsed without touching CUDA."""
    import subprocess

    from mlfarm.settings import Settings
    from mlfarm.worker import nodes

    calls = []

    def fake_run(args, **kw):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="NVIDIA H200, 143771\n", stderr="")

    monkeypatch.setattr(nodes.shutil, "which", lambda exe: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(nodes.subprocess, "run", fake_run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert nodes.gpu_properties() == ("NVIDIA H200", 143771 * 2**20)
    assert calls[0][-2:] == ["-i", "3"]  # the GPU this worker is pinned to
    settings = Settings(data_dir=tmp_path, storage_root=tmp_path)
    info = nodes.describe_worker(settings, "w@h", "cuda", ["gpu", "interactive"])
    assert (info.gpu, info.tags, info.facts["gpu_memory_gb"]) == ("NVIDIA H200", ["141gb", "gpu", "h200"], 140.4)
    assert info.queues == ["gpu", "interactive"]
    assert nodes.describe_worker(settings, "w@h", "cuda", ["gpu"], tags="Big, h200").tags == ["big", "h200"]
    assert nodes.describe_worker(settings, "w@h", "cpu", ["cpu"]).tags == ["cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert nodes.gpu_properties() is None


# --- bad workers --------------------------------------------------------------------------------
def start_workers(farm, *envs: dict[str, str]):
    """One worker per ``envs`` (its own extra environment), all ready."""
    started = []
    for env in envs:
        before = dict(farm.env_overrides)
        farm.env_overrides.update(env)
        started.append(farm.start_worker(wait=False))
        farm.env_overrides = before
    return [w.wait_ready() for w in started]


def test_a_worker_that_fails_a_job_goes_bad_and_another_worker_renders_it(farm):
    bad, good = start_workers(farm, {"FLAKY_BROKEN": "infer"}, {})
    frames = list(range(1, 13))
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("flaky", plate, out, frames, {"seconds": 0.25}, chunk=1)
    status = farm.wait_job(spec.id)

    assert status.state == "done", status.summary()
    assert all(f.worker.startswith(good.name + ":") for f in status.frames)
    assert all(os.path.exists(frame_path(out, f)) for f in frames)
    [record] = status.bad_workers
    assert record["name"] == bad.name and record["bad"] is True and record["failures"] >= 3
    assert BROKEN in record["reason"]
    retried = [f for f in status.frames if f.attempts > 1]
    assert len(retried) >= 3  # failed on the bad worker, then rendered on the good one
    bad.wait_log("is bad for this job after 3 failures")
    assert status.to_dict()["bad_workers"][0]["name"] == bad.name

    shown = farm.cli("status", spec.id, check=True).stdout
    assert "bad worker" in shown and bad.name in shown and "illegal memory access" in shown
    listed = json.loads(farm.cli("status", spec.id, "--json", check=True).stdout)
    assert [w["name"] for w in listed["bad_workers"]] == [bad.name]
    assert listed["bad_workers"][0]["reason"].endswith(BROKEN)

    # mlfarm retry gives every worker a new chance (and the frames that are done stay done).
    assert client.retry(spec.id) == [] and client.status(spec.id).workers == []


def test_a_model_that_will_not_load_counts_once_a_chunk_and_its_frames_render_elsewhere(farm):
    broken, good = start_workers(farm, {"FLAKY_BROKEN": "load"}, {})
    frames = list(range(1, 9))
    plate = make_plate(farm.storage / "plate", frames)
    spec = farm.farm().submit("flaky", plate, str(farm.storage / "out" / "o.####.exr"), frames,
                              {"seconds": 0.2}, chunk=2)
    status = farm.wait_job(spec.id)
    assert status.state == "done", status.summary()
    assert all(f.worker.startswith(good.name + ":") for f in status.frames)
    [record] = status.workers  # the good worker renders a chunk in 0.4 s: the broken one takes another meanwhile
    assert record["name"] == broken.name and record["failures"] >= 1
    assert "model flaky could not be loaded: RuntimeError: CUDA error: no kernel image" in record["reason"]
    # One failure per chunk it could not load, not one per frame: each such chunk's 2 frames ran twice.
    assert sum(1 for f in status.frames if f.attempts == 2) == 2 * record["failures"]
    assert all(f.attempts <= 2 for f in status.frames)


def test_input_errors_do_not_make_a_worker_bad(farm):
    farm.start_worker()
    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames)
    for f in (1, 2, 3, 4):
        corrupt(frame_path(plate, f))
    os.remove(frame_path(plate, 5))
    client = farm.farm()
    spec = client.submit("flaky", plate, str(farm.storage / "out" / "o.####.exr"), frames, chunk=2)
    status = farm.wait_job(spec.id)
    assert status.counts["failed"] == 5 and status.counts["done"] == 1
    assert status.workers == [] and status.bad_workers == []
    assert all(f.attempts == 1 for f in status.frames)
    assert {f.frame: f.reason for f in status.failed_frames}[5] == f"frame 5: {frame_path(plate, 5)}: file not found"
    # The same worker still takes the job's chunks: a retry with the plate fixed renders them.
    make_plate(farm.storage / "plate", [1, 2, 3, 4, 5])
    assert client.retry(spec.id, failed_only=True) == [1, 2, 3, 4, 5]
    assert farm.wait_job(spec.id).state == "done"


def test_the_last_worker_fails_the_frames_saying_so_instead_of_looping(farm):
    # One chunk at a time, so the frames fail in order (two side by side, a CPU worker's plan, can both
    # have started before the third failure makes the worker bad).
    [worker] = start_workers(farm, {"FLAKY_BROKEN": "infer", "MLFARM_WORKER_THREADS": "1"})
    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames)
    spec = farm.farm().submit("flaky", plate, str(farm.storage / "out" / "o.####.exr"), frames, chunk=1)
    status = farm.wait_job(spec.id, timeout=60)
    assert status.state == "failed" and status.counts["failed"] == 6
    reasons = {f.frame: f.reason for f in status.failed_frames}
    # Before it is bad, a lone worker fails frames as ever: no other worker could take them.
    assert reasons[1] == f"frame 1: model flaky: RuntimeError: {BROKEN}"
    assert reasons[3] == (f"frame 3: model flaky: RuntimeError: {BROKEN} ({worker.name} is bad for this job "
                          "after 3 such failures, and no other living worker can take it)")
    for f in (4, 5, 6):  # bad for the job: it renders none of them, and fails them saying why
        assert reasons[f].startswith(f"frame {f}: not rendered: every living worker that can take this job is bad "
                                     f"for it ({worker.name}; ")
    assert all(f.attempts == 1 for f in status.frames)
    assert [w["name"] for w in status.bad_workers] == [worker.name]
    assert worker.log().count("chunk") < 40  # no ping-pong


def test_two_broken_workers_each_try_a_frame_once_then_it_fails(farm):
    w1, w2 = start_workers(farm, {"FLAKY_BROKEN": "infer"}, {"FLAKY_BROKEN": "infer"})
    plate = make_plate(farm.storage / "plate", [1])
    spec = farm.farm().submit("flaky", plate, str(farm.storage / "out" / "o.####.exr"), [1])
    status = farm.wait_job(spec.id, timeout=60)
    [failed] = status.failed_frames
    assert failed.attempts == 2
    tried = sorted([w1.name, w2.name], key=lambda n: failed.reason.index(n))
    assert failed.reason == (f"frame 1: model flaky: RuntimeError: {BROKEN} (failed on {', '.join(tried)}: every "
                             "living worker that can take this job has failed this frame or is bad for the job)")
    assert {w["name"]: w["failures"] for w in status.workers} == {w1.name: 1, w2.name: 1}
    assert status.bad_workers == []  # one bad frame makes no worker bad


# --- tags, requirements and `mlfarm workers` ----------------------------------------------------
def test_a_model_requirement_is_merged_routed_and_reported(farm):
    from mlfarm.broker.reconcile import coverage, queue_keys

    plate = make_plate(farm.storage / "plate", [1, 2])
    client = farm.farm()
    spec = client.submit("bigmem", plate, str(farm.storage / "out" / "o.####.exr"), [1, 2], require="H200")
    assert spec.require == ["gpu_memory_gb>=24", "h200"]
    assert client.describe("bigmem")["requires"] == ["gpu_memory_gb>=24"]
    queue = "cpu@gpu_memory_gb>=24+h200"
    [key] = [k for k in queue_keys(client.redis) if client.redis.llen(k)]  # its list at the job's priority
    assert key.split(":")[0] == queue and client.redis.llen(key) == 1
    assert coverage(client.redis).frames[spec.id] == {1, 2}  # the reconciler sees the chunk: not lost
    message = json.loads(client.redis.lindex(key, 0))
    assert "'require': 'gpu_memory_gb>=24,h200'" in message["headers"]["kwargsrepr"]
    assert client.status(spec.id).no_worker == "waiting for a worker: none is running"
    with pytest.raises(Exception, match="neither a tag"):
        client.submit("bigmem", plate, str(farm.storage / "out2" / "o.####.exr"), [1], require=["80 gb"])


def test_chunks_wait_for_a_worker_with_the_tags_and_mlfarm_workers_lists_them(farm):
    farm.env_overrides["MLFARM_WORKER_DEAD_AFTER"] = "4"  # heartbeats (and new queues) every second
    farm.env_overrides["COLUMNS"] = "400"  # rich's tables on one line each
    [small] = start_workers(farm, {"MLFARM_WORKER_TAGS": "small"})
    frames = [1, 2, 3, 4]
    plate = make_plate(farm.storage / "plate", frames)
    client = farm.farm()
    spec = client.submit("passthrough", plate, str(farm.storage / "big" / "o.####.exr"), frames, chunk=2,
                         require=["big"])
    time.sleep(1.5)
    status = client.status(spec.id)
    waiting = "waiting for a worker with tag big (none of the 1 living worker has them)"
    assert status.state == "queued" and status.no_worker == waiting, status.summary()
    assert waiting in farm.cli("status", spec.id, check=True).stdout
    assert json.loads(farm.cli("status", spec.id, "--json", check=True).stdout)["no_worker"] == waiting

    [big] = start_workers(farm, {"MLFARM_WORKER_TAGS": "big,h200"})
    status = farm.wait_job(spec.id, timeout=60)
    assert status.state == "done" and status.no_worker == ""
    assert all(f.worker.startswith(big.name + ":") for f in status.frames)

    # A requirement queue that appears while a worker runs: it starts consuming it on its heartbeat.
    later = client.submit("passthrough", plate, str(farm.storage / "small" / "o.####.exr"), frames, chunk=4,
                          require="small")
    status = farm.wait_job(later.id, timeout=30)
    assert status.state == "done" and all(f.worker.startswith(small.name + ":") for f in status.frames)
    small.wait_log("takes jobs requiring small now")

    def listed():
        found = {w["name"]: w for w in json.loads(farm.cli("workers", "--json", check=True).stdout)}
        return found if found.get(big.name, {}).get("done_last_hour") == 4 and \
            found.get(small.name, {}).get("done_last_hour") == 4 else None

    found = small.wait_for(listed, "both workers' counts", timeout=20, every=0.5)
    assert found[small.name]["tags"] == ["small"] and found[big.name]["tags"] == ["big", "h200"]
    assert found[big.name]["models"] == ["passthrough"] and found[big.name]["failed_last_hour"] == 0
    assert found[small.name]["facts"]["gpu_memory_gb"] == 0 and found[small.name]["gpu"] == ""
    assert found[small.name]["requirement_queues"] == ["cpu@small"]
    assert found[big.name]["requirement_queues"] == ["cpu@big"]
    assert all(time.time() - w["heartbeat"] < 10 and w["jobs"] == [] for w in found.values())
    text = farm.cli("workers", check=True).stdout
    assert "2 living workers" in text and big.name in text and "big,h200" in text and small.name in text
