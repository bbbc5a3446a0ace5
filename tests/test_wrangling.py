"""Wrangler controls on a real farm: dependencies, pause and resume, a job's share of the workers.

The ``tally`` test model logs every frame it renders (so a test knows whether a frame ran twice)
and takes ``seconds`` a frame (so a test can act on a job while it runs).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mlfarm.client import SubmitError

from conftest import make_plate


def renders(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def wait_for(predicate, what: str, timeout: float = 60, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def assert_settled(client, job_id: str) -> None:
    """A finished job's counts, as every transition kept them, agree with a recount from its records:
    nothing in flight, waiting or unsent."""
    from mlfarm.keys import job_key, unsent_key

    kept = client.redis.hmget(job_key(job_id), ["inflight", "waiting"])
    assert [int(v) for v in kept] == [0, 0] and client.redis.zcard(unsent_key(job_id)) == 0, kept
    assert client.store.recount(job_id) == 0


def chunk_spans(records: dict[int, dict]) -> list[tuple[float, float]]:
    """(start, end) of each chunk that ran: its frames share the claim time ``t0``."""
    by_claim: dict[float, list[float]] = {}
    for rec in records.values():
        by_claim.setdefault(rec["t0"], []).append(rec["t1"])
    return sorted((t0, max(ends)) for t0, ends in by_claim.items())


def test_a_dependent_job_waits_unqueued_then_starts_within_a_second_of_its_parents_last_frame(farm):
    client = farm.farm()
    frames = list(range(1, 7))
    plate = make_plate(farm.storage / "plate", frames)
    parent = client.submit("tally", plate, str(farm.storage / "a" / "a.####.exr"), frames, {"seconds": 0.2},
                           chunk=2)
    child = client.submit("tally", str(farm.storage / "a" / "a.####.exr"), str(farm.storage / "b" / "b.####.exr"),
                          frames, {"gain": 3.0}, chunk=2, after=[parent.id])
    status = client.status(child.id)
    assert status.state == "waiting" and status.counts["waiting"] == 6
    assert status.waiting_on == [{"job": parent.id, "state": "queued"}]
    assert f"6 waiting on job {parent.id} (queued)" in status.summary()
    sent = [line for line in farm.broker_view(child.id).splitlines() if line.startswith(("queue ", "unacked "))]
    assert sent == []  # nothing of it was sent to Celery

    farm.start_worker()
    assert farm.wait_job(child.id).state == "done"
    assert_settled(client, parent.id)
    assert_settled(client, child.id)
    last_parent_frame = max(r["t1"] for r in client.store.frame_records(parent.id).values())
    first_child_frame = min(r["t0"] for r in client.store.frame_records(child.id).values())
    assert 0 <= first_child_frame - last_parent_frame < 1.0, first_child_frame - last_parent_frame


def test_a_failed_parent_keeps_its_dependents_waiting_and_says_so_until_it_is_retried(farm):
    import os

    from mlfarm.frames import frame_path

    client = farm.farm()
    frames = [1, 2, 3, 4]
    plate = make_plate(farm.storage / "plate", frames)
    os.remove(frame_path(plate, 3))
    parent = client.submit("tally", plate, str(farm.storage / "a" / "a.####.exr"), frames, chunk=2)
    child = client.submit("tally", str(farm.storage / "a" / "a.####.exr"), str(farm.storage / "b" / "b.####.exr"),
                          frames, chunk=2, after=[parent.id])
    farm.start_worker()
    assert farm.wait_job(parent.id).state == "failed"
    time.sleep(0.5)
    status = client.status(child.id)
    assert status.state == "waiting" and not status.finished
    assert status.waiting_on == [{"job": parent.id, "state": "failed"}]
    assert f"mlfarm retry {parent.id}" in status.summary()
    cli = farm.cli("status", child.id, check=True).stdout
    assert "waiting on" in cli and parent.id in cli and "failed" in cli

    make_plate(farm.storage / "plate", [3])
    client.retry(parent.id)
    assert farm.wait_job(child.id).state == "done"


def test_unknown_jobs_and_cycles_are_refused_at_submit(farm):
    from mlfarm.broker.jobs import JobSpec
    from mlfarm.prompts import load

    client = farm.farm()
    plate = make_plate(farm.storage / "plate", [1])
    out = str(farm.storage / "o" / "o.####.exr")
    with pytest.raises(SubmitError, match="cannot wait on job nosuchjob: no such job"):
        client.submit("tally", plate, out, [1], after=["nosuchjob"])
    with pytest.raises(SubmitError, match="no such job"):
        client.submit("tally", plate, out, [1], after_frames="nosuchjob")
    # A pipeline that names its jobs: A already waits on "b"; submitting "b" after A closes a loop.
    a = JobSpec(model="tally", input=plate, output=out, frames=[1], queue="cpu", after=["b"], id="a")
    client.store.create(a)
    with pytest.raises(SubmitError, match="would wait on itself"):
        client.submit("tally", plate, out, [1], after=["a"], job_id="b")
    with pytest.raises(SubmitError, match="would wait on itself"):
        client.submit("tally", plate, out, [1], after_frames="a", job_id="b")
    assert not client.store.exists("b")
    with pytest.raises(SubmitError, match="frame by frame"):
        client.submit("counter", plate, out, [1], after_frames="a", prompts=load(["1:obj:box=1,1,8,8"]))
    proc = farm.cli("submit", "--model", "tally", "--input", plate, "--frames", "1", "--output", out,
                    "--after", "nosuchjob")
    assert proc.returncode != 0 and "no such job" in proc.stderr + proc.stdout


def test_frame_by_frame_dependency_starts_before_its_parent_ends(farm):
    client = farm.farm()
    frames = list(range(1, 9))
    plate = make_plate(farm.storage / "plate", frames)
    parent = client.submit("tally", plate, str(farm.storage / "a" / "a.####.exr"), frames, {"seconds": 0.4},
                           chunk=2, priority=40)
    # Higher priority: once a frame of the parent is done, the child's frame goes ahead of the parent's chunks.
    child = client.submit("tally", str(farm.storage / "a" / "a.####.exr"), str(farm.storage / "b" / "b.####.exr"),
                          frames, chunk=2, after_frames=parent.id, priority=60)
    assert client.status(child.id).state == "waiting"
    farm.start_worker()
    assert farm.wait_job(child.id).state == "done"
    assert farm.wait_job(parent.id).state == "done"
    p, c = client.store.frame_records(parent.id), client.store.frame_records(child.id)
    for f in frames:
        assert c[f]["t0"] >= p[f]["t1"], f"frame {f} of the child started before the parent's was done"
    assert_settled(client, child.id)
    assert min(r["t1"] for r in c.values()) < max(r["t1"] for r in p.values()), "the child waited for the whole parent"


def test_pause_holds_frames_loses_none_and_resume_renders_none_twice(farm):
    client = farm.farm()
    frames = list(range(1, 13))
    log = farm.storage / "tally.log"
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "o" / "o.####.exr")
    farm.start_worker()
    spec = client.submit("tally", plate, out, frames, {"seconds": 0.25, "log": str(log)}, chunk=4)
    wait_for(lambda: client.status(spec.id).counts["done"] >= 1, "a first frame")
    held_now = client.pause(spec.id)
    assert held_now > 0
    st = wait_for(lambda: (s := client.status(spec.id)).counts["running"] == 0 and s, "running frames to finish")
    assert st.state == "paused" and st.paused and st.counts["held"] > 0
    assert st.counts["done"] + st.counts["held"] == 12, st.counts
    done_then = st.counts["done"]
    time.sleep(1.5)  # a paused job renders nothing
    st = client.status(spec.id)
    assert st.counts["done"] == done_then and st.state == "paused"
    assert len(renders(log)) == done_then
    cli = farm.cli("status", spec.id, check=True).stdout
    assert "paused" in cli and f"mlfarm resume {spec.id}" in cli

    proc = farm.cli("resume", spec.id, check=True)
    assert f"{st.counts['held']} frames queued again" in proc.stdout
    st = farm.wait_job(spec.id)
    assert st.state == "done" and st.counts["done"] == 12
    rendered = renders(log)
    assert len(rendered) == 12 and len(set(rendered)) == 12, rendered  # each frame once
    assert all(f.attempts == 1 for f in st.frames), [(f.frame, f.attempts) for f in st.frames]
    assert_settled(client, spec.id)


def test_pause_from_the_cli_before_any_worker_then_resume(farm):
    client = farm.farm()
    frames = list(range(1, 9))
    plate = make_plate(farm.storage / "plate", frames)
    spec = client.submit("tally", plate, str(farm.storage / "o" / "o.####.exr"), frames, chunk=2)
    proc = farm.cli("pause", spec.id, check=True)
    assert "8 queued frames held" in proc.stdout
    farm.start_worker()  # the two chunks already sent reach it, and are not run
    time.sleep(2.0)
    st = client.status(spec.id)
    assert st.state == "paused" and st.counts["held"] == 8 and st.counts["done"] == 0
    assert client.resume(spec.id) == 8
    assert farm.wait_job(spec.id).state == "done"


def test_a_paused_sequence_stops_at_a_frame_boundary_and_resumes_from_its_last_written_frame(farm):
    from mlfarm.prompts import load

    client = farm.farm()
    frames = list(range(1, 11))
    log = farm.storage / "steps.log"
    plate = make_plate(farm.storage / "plate", frames)
    out = str(farm.storage / "s" / "s.####.exr")
    farm.start_worker()
    spec = client.submit("counter", plate, out, frames, {"seconds": 0.25, "log": str(log)},
                         prompts=load(["1:obj:box=1,1,8,8"]))
    wait_for(lambda: client.status(spec.id).counts["done"] >= 2, "two frames")
    client.pause(spec.id)
    st = wait_for(lambda: (s := client.status(spec.id)).counts["running"] == 0 and s, "the stream to stop")
    assert st.state == "paused" and 0 < st.counts["done"] < 10, st.counts
    last = max(f.frame for f in st.frames if f.state == "done")
    assert all(f.state == "done" for f in st.frames if f.frame <= last)
    client.resume(spec.id)
    assert farm.wait_job(spec.id).state == "done"
    stepped = [int(line.split()[1]) for line in log.read_text().splitlines()]
    # After the resume the stream starts from the frame after the last written one (seeded by it).
    resumed_at = stepped.index(last + 1)
    assert stepped[:resumed_at] == list(range(1, last + 1)) and stepped[resumed_at:] == list(range(last + 1, 11))


def test_max_workers_keeps_one_chunk_in_flight_while_other_workers_idle(farm):
    client = farm.farm()
    frames = list(range(1, 9))
    plate = make_plate(farm.storage / "plate", frames)
    for _ in range(3):
        farm.start_worker(wait=False)
    for w in farm.workers:
        w.wait_ready()
    limited = client.submit("tally", plate, str(farm.storage / "l" / "l.####.exr"), frames, {"seconds": 0.3},
                            chunk=2, max_workers=1)
    assert farm.wait_job(limited.id).state == "done"
    spans = chunk_spans(client.store.frame_records(limited.id))
    assert len(spans) == 4
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.01, f"two chunks of a --max-workers 1 job overlapped: {spans}"
    assert "1 chunk in flight" in farm.cli("status", limited.id, check=True).stdout
    # The same job without the limit spreads over the three workers (so the check above could fail).
    free = client.submit("tally", plate, str(farm.storage / "f" / "f.####.exr"), frames, {"seconds": 0.3},
                         chunk=2)
    assert farm.wait_job(free.id).state == "done"
    spans = chunk_spans(client.store.frame_records(free.id))
    assert any(start < end for (_, end), (start, _) in zip(spans, spans[1:])), spans


def test_jobs_of_one_priority_take_turns_instead_of_first_come_first_served(farm):
    client = farm.farm()
    frames = list(range(1, 13))
    plate = make_plate(farm.storage / "plate", frames)
    a = client.submit("tally", plate, str(farm.storage / "a" / "a.####.exr"), frames, {"seconds": 0.1}, chunk=2)
    b = client.submit("tally", plate, str(farm.storage / "b" / "b.####.exr"), frames, {"seconds": 0.1}, chunk=2)
    farm.start_worker()
    assert farm.wait_job(a.id).state == "done" and farm.wait_job(b.id).state == "done"
    a_starts = sorted(r["t0"] for r in client.store.frame_records(a.id).values())
    b_starts = sorted(r["t0"] for r in client.store.frame_records(b.id).values())
    # First come, first served would run all six chunks of A before any of B.
    assert b_starts[0] < a_starts[-1], "job B waited for the whole of job A"
    assert a_starts[0] < b_starts[-1]


def test_feeding_costs_the_frames_it_sends_and_the_counts_survive_every_transition(farm):
    """No worker: the records are driven as workers and wranglers drive them, and after each step
    the counts the job keeps agree with a recount from its records."""
    from mlfarm.broker.jobs import JobSpec
    from mlfarm.keys import job_key, unsent_key

    store, r = farm.farm().store, farm.farm().redis
    spec = JobSpec(model="tally", input="/s/p.####.exr", output=str(farm.storage / "o.####.exr"),
                   frames=list(range(1, 21)), chunk=4, max_workers=2, queue="cpu")
    store.create(spec)

    def kept() -> tuple[int, int, int]:
        inflight, waiting = r.hmget(job_key(spec.id), ["inflight", "waiting"])
        return int(inflight), int(waiting), r.zcard(unsent_key(spec.id))

    def check(expected: tuple[int, int, int]) -> None:
        assert kept() == expected
        store.recount(spec.id)
        assert kept() == expected, "the counts drifted from the records"

    gen, sent = store.feed(spec)
    assert (gen, sent) == (0, list(range(1, 9)))  # two chunks of four: its --max-workers
    check((8, 0, 12))
    assert store.feed(spec) == (0, [])  # no room
    store.start_frames(spec.id, [1, 2, 3, 4], "w@a:1")
    for f in (1, 2, 3, 4):
        store.finish_frame(spec.id, f, "done", worker="w@a:1")
    check((4, 0, 12))
    assert store.feed(spec)[1] == [9, 10, 11, 12]
    check((8, 0, 8))
    assert store.pause(spec.id) == 16  # 5-20: queued, sent or not
    check((0, 0, 0))
    assert store.resume(spec.id) == 16
    check((0, 0, 16))
    gen, sent = store.feed(spec)
    assert gen == 1 and sent == [5, 6, 7, 8, 9, 10, 11, 12]
    assert store.start_frames(spec.id, [5], "w@a:1") == {5: "stale"}  # a message from before the pause
    store.start_frames(spec.id, [5, 6], "w@a:1", generation=1)
    assert store.reclaim(spec.id, [5, 6], dead_worker="w@a:1") == [5, 6]  # its worker died
    check((6, 0, 10))
    assert store.cancel(spec.id) == 16
    check((0, 0, 0))
    store.requeue(spec.id, ("cancelled",))
    check((0, 0, 16))
