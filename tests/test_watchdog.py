"""The frame time limit inside a worker process (worker/watchdog.py), on real threads."""

from __future__ import annotations

import threading
import time

import pytest
from celery.exceptions import Reject

from mlfarm.worker.sharing import GateClosed, TaskGate
from mlfarm.worker.watchdog import EXIT_HUNG, Watchdog


class Exits:
    """Stands in for os._exit: records the status and when it came."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.at: float | None = None
        self.done = threading.Event()

    def __call__(self, status: int) -> None:
        self.status, self.at = status, time.monotonic()
        self.done.set()


def test_a_stage_that_ends_in_time_never_fires():
    exits, stop = Exits(), threading.Event()
    dog = Watchdog(stop, poll=0.02, exit_process=exits)
    for _ in range(5):
        with dog.busy(), dog.watch(0.3, "job j: reading of frame 1", lambda: pytest.fail("expired")):
            time.sleep(0.05)
    time.sleep(0.5)  # well past every deadline, with nothing watched any more
    assert exits.status is None and not stop.is_set() and dog.expired is None


def test_a_stuck_stage_fails_its_frames_stops_the_others_and_ends_the_process_after_they_finish():
    exits, stop, expired = Exits(), threading.Event(), []
    gate = TaskGate()
    order: list[str] = []

    def turn_away() -> None:  # the runtime's: stop consuming, then close the gate
        order.append("no more tasks")
        gate.close()

    dog = Watchdog(stop, on_stop=turn_away, poll=0.02, grace=10, exit_process=exits)
    stuck_forever = threading.Event()
    other_ended = threading.Event()

    def stuck() -> None:
        def fail_and_hand_back() -> None:
            order.append("handed back")
            expired.append(time.monotonic())

        with dog.busy(), gate.hold("model m"), dog.watch(0.3, "job j: model m of frame 2", fail_and_hand_back):
            stuck_forever.wait(20)

    def other() -> None:  # a chunk beside it: stops at its next batch once stop is set, then hands back
        with dog.busy(), gate.hold("model m"):
            while not stop.is_set():
                time.sleep(0.01)
            time.sleep(0.4)  # handing its frames back takes a while
            other_ended.set()

    turned_away: list[BaseException] = []

    def waiting() -> None:  # another job's chunk, waiting for its turn behind them
        try:
            with dog.busy(), gate.hold("model n"):
                pytest.fail("a chunk of another key ran beside a stuck one")
        except Reject as exc:
            turned_away.append(exc)

    threads = [threading.Thread(target=f, daemon=True) for f in (stuck, other)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(0.05)
    waiter = threading.Thread(target=waiting, daemon=True)
    waiter.start()
    assert exits.done.wait(5), "the process was never ended"
    stuck_forever.set()
    assert exits.status == EXIT_HUNG
    assert expired and expired[0] - start >= 0.3
    assert order == ["no more tasks", "handed back"]  # nothing handed back that this process could fetch
    assert stop.is_set() and dog.expired is not None and dog.expired.what == "job j: model m of frame 2"
    assert other_ended.is_set() and exits.at >= expired[0] + 0.4  # it waited for the other chunk
    waiter.join(2)
    assert len(turned_away) == 1 and isinstance(turned_away[0], GateClosed) and turned_away[0].requeue


def test_chunks_that_never_finish_hand_their_work_back_when_the_grace_is_over():
    """A chunk whose batch waits on the lane behind the stuck one never reaches its next batch to
    stop there: once the grace is over its work goes back through its release."""
    exits, stop, released = Exits(), threading.Event(), []
    dog = Watchdog(stop, poll=0.02, grace=0.5, exit_process=exits)
    forever = threading.Event()

    def chunk(seconds: float) -> None:
        with dog.busy(lambda: released.append((seconds, time.monotonic()))), \
                dog.watch(seconds, "job j: writing of frame 1", lambda: None):
            forever.wait(20)

    for seconds in (0.2, 60):
        threading.Thread(target=chunk, args=(seconds,), daemon=True).start()
    start = time.monotonic()
    assert exits.done.wait(5)
    forever.set()
    assert exits.status == EXIT_HUNG and 0.5 <= exits.at - start < 3
    assert sorted(s for s, _ in released) == [0.2, 60]  # the stuck one's too: releases are idempotent
    assert all(start + 0.5 <= at <= exits.at for _, at in released)


def test_the_supervisor_says_why_a_worker_ended_itself():
    from mlfarm.worker.supervisor import describe_exit

    assert "stuck past MLFARM_FRAME_TIME_LIMIT" in describe_exit(EXIT_HUNG)
    assert describe_exit(1) == "exit status 1" and describe_exit(-9) == "killed by SIGKILL"
