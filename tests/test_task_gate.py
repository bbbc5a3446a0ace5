"""TaskGate: which tasks one worker process runs side by side (Settings.worker_threads)."""

from __future__ import annotations

import threading
import time

from mlfarm.worker.sharing import TaskGate


def start(gate: TaskGate, key: str, log: list[str], name: str, release: threading.Event) -> threading.Thread:
    def body() -> None:
        with gate.hold(key):
            log.append(name)
            release.wait(10)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def holding_a(gate: TaskGate, log: list[str]) -> tuple[threading.Thread, threading.Event]:
    """A task with key "a" inside the gate (logged as "a"), until the returned event is set."""
    release = threading.Event()
    thread = start(gate, "a", log, "a", release)
    wait_until(lambda: log == ["a"])
    return thread, release


def test_tasks_with_one_key_run_together():
    gate, log, release = TaskGate(), [], threading.Event()
    threads = [start(gate, "model a {}", log, f"t{i}", release) for i in range(3)]
    wait_until(lambda: len(log) == 3)  # all three inside at once
    assert gate.running == 3
    release.set()
    for t in threads:
        t.join(5)
    assert gate.running == 0


def test_a_task_with_another_key_waits_for_the_running_ones():
    gate, log = TaskGate(), []
    a, first = holding_a(gate, log)
    second = threading.Event()
    b = start(gate, "b", log, "b", second)
    time.sleep(0.3)
    assert log == ["a"]  # b waits while a runs
    first.set()
    a.join(5)
    wait_until(lambda: log == ["a", "b"])
    second.set()
    b.join(5)


def test_first_come_first_served_a_waiting_task_is_not_overtaken():
    """a runs; b (another key) waits; a2 arrives with a's key: it must not join a ahead of b."""
    gate, log = TaskGate(), []
    a, release_a = holding_a(gate, log)
    release_b, release_a2 = threading.Event(), threading.Event()
    b = start(gate, "b", log, "b", release_b)
    wait_until(lambda: len(gate._queue) == 1)
    a2 = start(gate, "a", log, "a2", release_a2)
    wait_until(lambda: len(gate._queue) == 2)
    time.sleep(0.2)
    assert log == ["a"]
    release_a.set()
    wait_until(lambda: log == ["a", "b"])
    time.sleep(0.2)
    assert log == ["a", "b"]  # a2 waits for b in turn
    release_b.set()
    wait_until(lambda: log == ["a", "b", "a2"])
    release_a2.set()
    for t in (a, b, a2):
        t.join(5)
    assert gate.running == 0


def test_waiting_tasks_with_one_key_start_together():
    gate, log = TaskGate(), []
    a, release_a = holding_a(gate, log)
    release_b = threading.Event()
    bs = [start(gate, "b", log, f"b{i}", release_b) for i in range(2)]
    wait_until(lambda: len(gate._queue) == 2)
    release_a.set()
    wait_until(lambda: sorted(log) == ["a", "b0", "b1"])
    assert gate.running == 2
    release_b.set()
    for t in (a, *bs):
        t.join(5)


def test_a_failing_task_releases_its_turn():
    gate = TaskGate()
    try:
        with gate.hold("a"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    entered = []
    with gate.hold("b"):
        entered.append(True)
    assert entered == [True] and gate.running == 0


def test_interrupted_names_the_frames_a_dead_worker_left_running(farm):
    """What makes a chunk run alone: its frames' records still say running (real Redis, real Lua)."""
    from mlfarm.broker.jobs import DONE, JobSpec

    store = farm.farm().store
    spec = JobSpec(model="passthrough", input="/s/p.####.exr", output=str(farm.storage / "o.####.exr"),
                   frames=[1, 2, 3, 4], chunk=2, queue="cpu")
    store.create(spec, unsent=False)
    assert store.interrupted(spec.id, [1, 2, 3, 4]) == []  # queued: a first delivery
    store.start_frames(spec.id, [1, 2, 3], "dead@host")
    store.finish_frame(spec.id, 1, DONE, worker="dead@host")
    assert store.interrupted(spec.id, [1, 2]) == [2]  # 1 finished, 2 was in the model when it died
    assert store.interrupted(spec.id, [3, 4]) == [3]
