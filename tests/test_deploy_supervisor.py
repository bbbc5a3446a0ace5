"""`mlfarm worker --gpus`: one real worker process per GPU, pinned, restarted when killed, and stopped
together with a warm shutdown that loses no frame. This machine has no GPU: the GPU list is given
explicitly and MLFARM_DEVICE=cpu lets the pinned workers render on the CPU."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from mlfarm.cpus import CpuSpecError, format_cpus, parse_cpus, split_cpus
from mlfarm.frames import frame_path
from mlfarm.worker.supervisor import (
    REFUSED_EXIT,
    Child,
    GpuSpecError,
    Supervisor,
    build_children,
    child_name,
    gpu_memory_gib,
    parse_gpus,
    visible_gpus,
    workers_per_gpu,
)

from conftest import MlfarmProcess, assert_no_unrecoverable_error, make_plate

FAST_REDELIVERY = {  # a chunk whose worker was SIGKILLed is redelivered within seconds, not an hour
    "MLFARM_FRAME_TIME_LIMIT": "3",
    "MLFARM_CHUNK_SLACK": "2",
    "MLFARM_VISIBILITY_TIMEOUT": "12",
    "MLFARM_RESTORE_INTERVAL": "1",
}
STARTED = re.compile(r"supervisor: started (\S+) on GPU (\S+) \(pid (\d+)\)")


class SupervisorProcess(MlfarmProcess):
    """`python -m mlfarm worker --gpus ...` with its (and its children's) output in one log."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str):
        super().__init__(["worker", *args], env, log_path)

    def wait_for(self, predicate, what: str, timeout: float = 90):
        return super().wait_for(predicate, what, timeout, every=0.1)

    def started(self) -> list[tuple[str, str, int]]:
        return [(m[1], m[2], int(m[3])) for m in STARTED.finditer(self.log())]

    def wait_ready(self, name: str, times: int = 1) -> None:
        self.wait_for(lambda: self.log().count(f"{name} ready.") >= times, f"{name} ready x{times}")

    def stop(self, timeout: float = 60) -> int:
        return super().stop(timeout)


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() \
        else "X"
    return state not in ("Z", "X")


@pytest.fixture
def supervisors(farm):
    started: list[SupervisorProcess] = []

    def start(*args: str) -> SupervisorProcess:
        s = SupervisorProcess(farm.env, farm.root / f"supervisor{len(started)}.log", *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
    assert_no_unrecoverable_error(started)


def test_one_pinned_worker_per_gpu_and_a_killed_one_is_restarted(farm, supervisors):
    farm.env_overrides.update(FAST_REDELIVERY)
    host = "farmhost"
    sup = supervisors("--gpus", "0,1", "--name", "render-gpu{gpu}@" + host)
    for gpu in ("0", "1"):
        sup.wait_ready(f"render-gpu{gpu}@{host}")
    children = {gpu: (name, pid) for name, gpu, pid in sup.started()}
    assert sorted(children) == ["0", "1"]
    # MLFARM_WORKERS_PER_GPU=auto, and these "GPUs" are not there to ask: one process each.
    assert "one worker per GPU (auto: a GPU's memory is unknown)" in sup.log()
    # Each GPU's worker has its own half of the cores (this machine's two: one each).
    shares = [os.sched_getaffinity(children[g][1]) for g in ("0", "1")]
    assert shares == [set(s) for s in split_cpus(2)] and not shares[0] & shares[1], shares
    assert shares[0] | shares[1] == os.sched_getaffinity(0)
    for gpu, (name, pid) in children.items():
        env = proc_environ(pid)
        assert env["CUDA_VISIBLE_DEVICES"] == gpu
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert name == f"render-gpu{gpu}@{host}"
        assert f"PPid:\t{sup.proc.pid}\n" in Path(f"/proc/{pid}/status").read_text()

    # 12 chunks: each worker takes three at once (MLFARM_WORKER_THREADS), so some are still queued
    # when GPU 0's worker comes back, and it renders them.
    frames = list(range(1, 25))
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("slow", plate, out, frames, {"seconds": 1.0}, chunk=2, name="sh020 Read3")
    victim_name, victim_pid = children["0"]

    def victim_busy():
        st = client.status(spec.id)
        return any(f.state == "running" and f.worker.startswith(victim_name) for f in st.frames)

    sup.wait_for(victim_busy, "a frame running on GPU 0's worker")
    os.kill(victim_pid, signal.SIGKILL)
    # What the dead worker left "running" is what it was rendering when it died.
    killed_frames = [f.frame for f in client.status(spec.id).frames
                     if f.state == "running" and f.worker.endswith(f":{victim_pid}")]
    assert killed_frames, client.status(spec.id).frames
    sup.wait_for(lambda: "killed by SIGKILL; restarting it" in sup.log(), "restart notice")
    sup.wait_ready(victim_name, times=2)
    restarted = [pid for name, gpu, pid in sup.started() if gpu == "0"]
    assert len(restarted) == 2 and restarted[1] != victim_pid and not alive(victim_pid)
    assert proc_environ(restarted[1])["CUDA_VISIBLE_DEVICES"] == "0"
    assert alive(children["1"][1])  # the other GPU's worker was left alone

    status = farm.wait_job(spec.id, timeout=120)
    assert status.state == "done", status.summary()
    assert all(Path(frame_path(out, f)).is_file() for f in frames)
    workers = {f.worker.split(":")[0] for f in status.frames}
    assert workers == {"render-gpu0@farmhost", "render-gpu1@farmhost"}, workers
    by_frame = {f.frame: f for f in status.frames}
    for f in killed_frames:  # the chunk killed with its worker was redelivered and rendered again
        assert by_frame[f].attempts == 2 and not by_frame[f].worker.endswith(f":{victim_pid}"), by_frame[f]

    # Shut down from Flower (a remote-control broadcast): a clean exit, so it stays down.
    client.app.control.shutdown(destination=["render-gpu1@farmhost"])
    sup.wait_for(lambda: "asked to shut down, not restarting it" in sup.log(), "clean-exit notice")
    time.sleep(1.5)
    assert not alive(children["1"][1]) and len(sup.started()) == 3 and sup.proc.poll() is None

    assert sup.stop() == 0
    assert not alive(restarted[1])


def test_cpus_without_splitting_pin_every_worker_to_all_of_them(farm, supervisors):
    first = min(os.sched_getaffinity(0))
    farm.env_overrides["MLFARM_SPLIT_CPUS"] = "false"
    sup = supervisors("--gpus", "0,1", "--cpus", str(first))
    children = sup.wait_for(lambda: len(sup.started()) == 2 and sup.started(), "two workers started")
    assert [os.sched_getaffinity(pid) for _, _, pid in children] == [{first}, {first}]
    placed = next(line for line in sup.log().splitlines() if "one worker per GPU" in line)
    assert " cores " not in placed, placed  # nothing shared out: they inherit the supervisor's cores
    for name, _, _ in children:
        sup.wait_ready(name)


def test_several_workers_share_a_gpu_each_on_its_own_cores_and_all_take_chunks(farm, supervisors):
    """MLFARM_WORKERS_PER_GPU=2: two processes pinned to the same GPU, named apart, each on its
    own share of the cores, and both render chunks of one job."""
    farm.env_overrides["MLFARM_WORKERS_PER_GPU"] = "2"
    host = "farmhost"
    sup = supervisors("--gpus", "0", "--name", "render-gpu{gpu}@" + host, "--queues", "gpu,cpu,train")
    names = [f"render-gpu0.{k}@{host}" for k in (0, 1)]
    for name in names:
        sup.wait_ready(name)
    children = sup.started()
    assert [(n, g) for n, g, _ in children] == [(names[0], "0"), (names[1], "0")]
    assert [proc_environ(pid)["CUDA_VISIBLE_DEVICES"] for _, _, pid in children] == ["0", "0"]
    # A training run takes its whole GPU: only the first process of the GPU takes them.
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for _, _, pid in children]
    assert [c[c.index(b"--queues") + 1] for c in cmdlines] == [b"gpu,cpu,train", b"gpu,cpu"]
    shares = [os.sched_getaffinity(pid) for _, _, pid in children]
    assert shares == [set(s) for s in split_cpus(2)] and not shares[0] & shares[1], shares
    assert "2 workers per GPU" in sup.log()

    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("slow", plate, out, frames, {"seconds": 1.0}, chunk=1)
    status = farm.wait_job(spec.id, timeout=120)
    assert status.state == "done", status.summary()
    assert {f.worker.split(":")[0] for f in status.frames} == set(names)
    assert sup.stop() == 0


def test_sigterm_stops_every_worker_warm_and_loses_no_frame(farm, supervisors):
    sup = supervisors("--gpus", "0,1")
    host = os.uname().nodename
    for gpu in ("0", "1"):
        sup.wait_ready(f"mlfarm-gpu{gpu}@{host}")
    pids = [pid for _, _, pid in sup.started()]

    # 12 chunks: more than the two workers take at once (MLFARM_WORKER_THREADS each), so some stay queued.
    frames = list(range(1, 25))
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("slow", plate, out, frames, {"seconds": 0.5}, chunk=2)

    def two_running():
        st = client.status(spec.id)
        running = [f for f in st.frames if f.state == "running"]
        return running if len({f.worker for f in running}) == 2 else None

    running = sup.wait_for(two_running, "both workers rendering")
    in_flight = {f.frame for f in running}
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(60) == 0, sup.log()
    assert not any(alive(pid) for pid in pids)
    assert "warm shutdown" in sup.log()

    after = client.status(spec.id)
    states = {f.frame: f.state for f in after.frames}
    assert "running" not in states.values(), after.summary()
    # Warm: a chunk running at SIGTERM is finished, not abandoned (its frames are done now).
    assert all(states[f] == "done" for f in in_flight), (in_flight, states)
    assert "queued" in states.values()  # the rest stayed on the queue for whoever comes next

    farm.start_worker()
    status = farm.wait_job(spec.id, timeout=120)
    assert status.state == "done", status.summary()
    assert all(f.attempts == 1 for f in status.frames), [(f.frame, f.attempts) for f in status.frames]
    assert all(Path(frame_path(out, f)).is_file() for f in frames)


# --- the rules, without workers ------------------------------------------------------------------
def test_gpu_lists_and_names():
    assert parse_gpus("0,1", {}) == ["0", "1"]
    assert parse_gpus("all", {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8a1b-22,-1,3"}) == ["GPU-8a1b-22"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    with pytest.raises(GpuSpecError, match="no GPU is visible"):
        parse_gpus("all", {"CUDA_VISIBLE_DEVICES": "-1"})
    with pytest.raises(GpuSpecError, match="listed twice"):
        parse_gpus("0,1,0", {})
    with pytest.raises(GpuSpecError, match="bad: 0 1"):
        parse_gpus("0 1", {})
    assert child_name(None, "3", 0, True, "h") == "mlfarm-gpu3@h"
    assert child_name("r-{gpu}@h", "GPU-8a1b", 1, True) == "r-1@h"
    assert child_name("gpu5@h", "0", 0, False) == "gpu5@h"  # a container owning host GPU 5 sees it as 0
    with pytest.raises(GpuSpecError, match=r"\{gpu\}"):
        child_name("render@h", "0", 0, True)
    assert child_name(None, "3", 0, True, "h", instance=1) == "mlfarm-gpu3.1@h"
    assert child_name("r-{gpu}@h", "0", 0, True, instance=0) == "r-0.0@h"
    assert child_name("gpu5@h", "0", 0, False, instance=1) == "gpu5.1@h"  # one card, two processes


def test_workers_per_gpu_make_that_many_children_per_gpu_in_order():
    shares = [[0], [1], [2], [3]]
    children = build_children(["0", "1"], ["gpu", "train"], [], None, env={}, cpu_shares=shares, per_gpu=2)
    assert [(c.gpu, c.env["CUDA_VISIBLE_DEVICES"]) for c in children] == [("0", "0"), ("0", "0"), ("1", "1"),
                                                                          ("1", "1")]
    assert [c.name.split("@")[0] for c in children] == ["mlfarm-gpu0.0", "mlfarm-gpu0.1", "mlfarm-gpu1.0",
                                                         "mlfarm-gpu1.1"]
    assert [c.argv[c.argv.index("--cpus") + 1] for c in children] == ["0", "1", "2", "3"]
    assert [c.argv[c.argv.index("--queues") + 1] for c in children] == ["gpu,train", "gpu", "gpu,train", "gpu"]
    one = build_children(["0"], ["gpu"], [], None, env={})
    assert [c.name.split("@")[0] for c in one] == ["mlfarm-gpu0"]


def test_auto_workers_per_gpu_takes_two_only_where_memory_and_cores_allow(tmp_path, monkeypatch):
    assert workers_per_gpu("auto", [79.6, 79.6], 32) == (2, "auto: 80 GiB a GPU, 32 cores")
    assert workers_per_gpu("auto", [79.6, 23.6], 32)[0] == 1  # the smallest card decides
    assert workers_per_gpu("auto", [79.6, 79.6], 15) == (1, "auto: 15 cores for 2 GPU(s), under 8 a GPU")
    assert workers_per_gpu("auto", [79.6, None], 32) == (1, "auto: a GPU's memory is unknown")
    assert workers_per_gpu(3, [], 2) == (3, "MLFARM_WORKERS_PER_GPU")
    # nvidia-smi's own output format (MiB, one line per GPU asked for with -i)
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\nprintf '81559\\n24564\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert [round(m, 1) for m in gpu_memory_gib(["0", "GPU-8a1b"])] == [79.6, 24.0]
    assert "-i 0,GPU-8a1b" in (tmp_path / "args").read_text()
    (tmp_path / "args").unlink()
    # nvidia-smi would report a MIG slice's whole GPU: torch is asked (here it sees no GPU at all)
    assert gpu_memory_gib(["MIG-4b1f-77"]) == [None]
    assert not (tmp_path / "args").exists()


def test_cpu_lists_and_shares():
    cores = sorted(os.sched_getaffinity(0))
    assert parse_cpus(format_cpus(cores)) == cores
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert split_cpus(2, list(range(32))) == [list(range(16)), list(range(16, 32))]
    assert split_cpus(3, [0, 1, 2, 3, 8, 9, 10]) == [[0, 1], [2, 3], [8, 9, 10]]
    with pytest.raises(CpuSpecError, match="a core each"):
        split_cpus(3, [0, 1])
    with pytest.raises(CpuSpecError, match="not available"):
        parse_cpus(f"{max(cores) + 1}")
    assert parse_cpus(f"{max(cores) + 1}-{max(cores) + 2}", check=False) == [max(cores) + 1, max(cores) + 2]
    with pytest.raises(CpuSpecError, match="expected cores"):
        parse_cpus("0-x")
    with pytest.raises(CpuSpecError, match="bad range"):
        parse_cpus("3-1")


def test_cli_refuses_bad_gpu_options_before_starting_anything(farm):
    for args, message in [
        (("--cpus", "4096"), "not available to this process"),
        (("--gpus", "0,1,2", "--cpus", "0"), "a core each"),
        (("--gpus", "0,0"), "listed twice"),
        (("--gpus", "0", "--gpu", "1"), "not both"),
        (("--gpus", "0,1", "--name", "render@x"), "{gpu}"),
        (("--gpus", "0", "--queues", "gpu,nope"), "unknown queue nope"),
    ]:
        proc = farm.cli("worker", *args, timeout=60)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "started" not in proc.stderr
    farm.env_overrides["MLFARM_CPUS"] = "4096"  # as compose passes a container's share
    proc = farm.cli("worker", timeout=60)
    assert proc.returncode == 2 and "--cpus '4096': cores 4096 are not available" in proc.stderr, proc.stderr
    del farm.env_overrides["MLFARM_CPUS"]
    farm.env_overrides["CUDA_VISIBLE_DEVICES"] = ""
    proc = farm.cli("worker", "--gpus", "all", timeout=60)
    assert proc.returncode == 2 and "no GPU is visible" in proc.stderr, proc.stderr


def _child(code: str, gpu: str) -> Child:
    return Child(gpu=gpu, name=f"t{gpu}", argv=[sys.executable, "-c", code], env=dict(os.environ))


def test_a_child_that_refuses_its_configuration_stops_the_rest():
    sleeper = _child("import time; time.sleep(60)", "0")
    refuser = _child("import sys, time; time.sleep(0.5); sys.exit(2)", "1")
    t0 = time.monotonic()
    assert Supervisor([sleeper, refuser]).run() == REFUSED_EXIT
    assert time.monotonic() - t0 < 30
    assert refuser.starts == 1 and sleeper.starts == 1  # refused: not restarted
    assert not alive(sleeper.pids[0])


def test_a_child_that_exits_cleanly_is_not_restarted_but_a_crashed_one_is():
    clean = _child("pass", "0")
    crasher = _child("import os, sys; sys.exit(0 if os.path.exists(os.environ['MARK']) else "
                     "(open(os.environ['MARK'], 'w') and 1))", "1")
    mark = Path(f"/tmp/mlfarm-supervisor-test-{os.getpid()}")
    mark.unlink(missing_ok=True)
    crasher.env["MARK"] = str(mark)
    try:
        assert Supervisor([clean, crasher]).run() == 0
    finally:
        mark.unlink(missing_ok=True)
    assert clean.starts == 1  # exit 0: asked to shut down (e.g. from Flower), left down
    assert crasher.starts == 2  # exit 1: restarted once, then it exited cleanly


def test_workers_stop_when_the_supervisor_is_killed_outright(farm, supervisors):
    sup = supervisors("--gpus", "3", "--name", "lone@farmhost")
    sup.wait_ready("lone@farmhost")
    ((_, gpu, pid),) = sup.started()
    assert gpu == "3" and proc_environ(pid)["CUDA_VISIBLE_DEVICES"] == "3"
    sup.proc.kill()  # SIGKILL: no chance to forward anything
    sup.proc.wait()
    deadline = time.monotonic() + 30
    while alive(pid):  # the kernel sent it SIGTERM (PR_SET_PDEATHSIG): a warm shutdown, no orphan
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"worker {pid} outlived its supervisor:\n{sup.log()}")
        time.sleep(0.1)
    assert "Warm shutdown" in sup.log() or "warm shutdown" in sup.log().lower(), sup.log()[-2000:]


def test_a_second_sigterm_abandons_running_chunks_to_redis_not_to_oblivion(farm, supervisors):
    farm.env_overrides.update(FAST_REDELIVERY)
    sup = supervisors("--gpus", "0", "--name", "impatient@farmhost")
    sup.wait_ready("impatient@farmhost")
    ((_, _, pid),) = sup.started()
    frames = [1, 2, 3]
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "out" / "o.####.exr")
    client = farm.farm()
    spec = client.submit("slow", plate, out, frames, {"seconds": 2.5}, chunk=3)  # one 7.5 s chunk
    sup.wait_for(lambda: client.status(spec.id).counts["running"] >= 1, "the chunk running")
    t0 = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    sup.proc.send_signal(signal.SIGTERM)  # the wrangler will not wait for the chunk
    assert sup.proc.wait(30) == 0
    assert time.monotonic() - t0 < 5 and not alive(pid)
    assert "killed by SIGKILL" in sup.log()

    farm.start_worker(name="rescuer@test")
    status = farm.wait_job(spec.id, timeout=90)
    assert status.state == "done", status.summary()
    assert all(f.worker.startswith("rescuer@test") for f in status.frames if f.attempts == 2)
    assert any(f.attempts == 2 for f in status.frames)  # the abandoned chunk came back and was rendered
    assert all(Path(frame_path(out, f)).is_file() for f in frames)
