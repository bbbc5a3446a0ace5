"""Whole-GPU turns (worker/gpu_turns.py): one batch at a time on a GPU, across threads and processes.

The lock itself is plain Linux (``flock``) and is tested here with real processes; the CUDA parts
(a turn keyed by the GPU's UUID, its work finished and the cache freed at its end) run on a GPU.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from mlfarm.worker.gpu_turns import GpuTurns, cuda_turn
from mlfarm.worker.pipeline import ChunkRun


def _hold(folder: str, key: str, log: str, rounds: int, hold_s: float) -> None:
    turns = GpuTurns(Path(folder))
    for _ in range(rounds):
        with turns.turn(key):
            start = time.monotonic()
            time.sleep(hold_s)
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {start} {time.monotonic()}\n")


def _overlaps(lines: list[str]) -> list[tuple[str, str]]:
    spans = sorted((float(a), float(b), line) for line in lines for _, a, b in [line.split()])
    return [(p[2], q[2]) for p, q in zip(spans, spans[1:]) if q[0] < p[1]]


def test_processes_take_turns(tmp_path):
    """Three processes, four turns each: no two turns of one key overlap, and all of them ran."""
    log = tmp_path / "turns.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold, args=(str(tmp_path / "locks"), "gpu-A", str(log), 4, 0.05)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 12
    assert len({line.split()[0] for line in lines}) == 3
    assert _overlaps(lines) == []


def test_other_gpus_do_not_wait(tmp_path):
    """A turn on one GPU does not hold up a turn on another."""
    turns, other = GpuTurns(tmp_path), GpuTurns(tmp_path)
    with turns.turn("gpu-A"):
        entered = threading.Event()

        def run() -> None:
            with other.turn("gpu-B"):
                entered.set()

        t = threading.Thread(target=run)
        t.start()
        assert entered.wait(10)
        t.join()


def test_threads_of_one_process_take_turns(tmp_path):
    """flock alone would let a process's threads in together (it locks per open file): they take turns too."""
    turns = GpuTurns(tmp_path)
    inside, most, lock = 0, 0, threading.Lock()

    def run() -> None:
        nonlocal inside, most
        for _ in range(5):
            with turns.turn("gpu-A"):
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.01)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_finish_runs_inside_the_turn_even_after_an_error(tmp_path):
    """``finish`` (on a GPU: wait for the batch, free the cache) runs before the next turn starts,
    also when the batch raised; and the error goes on to the caller."""
    turns = GpuTurns(tmp_path)
    events: list[str] = []
    with pytest.raises(RuntimeError, match="out of memory"):
        with turns.turn("gpu-A", finish=lambda: events.append("finish")):
            events.append("batch")
            raise RuntimeError("out of memory")
    with turns.turn("gpu-A", finish=lambda: events.append("finish 2")):
        events.append("next")
    assert events == ["batch", "finish", "next", "finish 2"]


def test_a_killed_holder_lets_go(tmp_path):
    """A worker killed (SIGKILL) in the middle of its turn does not keep the GPU from the others."""
    ctx = multiprocessing.get_context("spawn")
    holder = ctx.Process(target=_hold, args=(str(tmp_path), "gpu-A", str(tmp_path / "log"), 1, 60.0))
    holder.start()
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("*.lock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # in its turn now
    waiter = GpuTurns(tmp_path)
    got = threading.Event()

    def wait() -> None:
        with waiter.turn("gpu-A"):
            got.set()

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    assert not got.wait(0.5)  # held
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert got.wait(10)


def test_only_models_that_ask_take_turns_and_only_on_cuda(tmp_path):
    """The pipeline takes a turn for a model with ``gpu_turns`` on CUDA, and for no model on the CPU."""
    from mlfarm.models.base import BaseModel

    run = ChunkRun.__new__(ChunkRun)
    run.turns = GpuTurns(tmp_path)
    model = BaseModel()
    model.gpu_turns, model.torch_device = True, "cpu"
    with run._turn(model):
        pass
    assert not list(tmp_path.glob("*.lock"))  # no turn was taken
    from mlfarm.models.catalog import Catalog, discover

    assert Catalog(discover()).entry("flow").create().gpu_turns  # RAFT fills the GPU by itself


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_cuda_turn_waits_for_the_work_and_frees_the_cache(tmp_path):
    turns = GpuTurns(tmp_path)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    with cuda_turn(turns, torch, "cuda"):
        big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):
            busy = busy @ busy
        del big
        assert torch.cuda.memory_reserved() >= before + (1 << 30)
    assert torch.cuda.current_stream().query()  # the turn's work was done when it ended
    assert torch.cuda.memory_reserved() < before + (512 << 20)  # and its cache given back
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    assert [p.name for p in tmp_path.glob("*.lock")] == [f"gpu-{uuid}.lock".replace(" ", "_")]
    del busy
