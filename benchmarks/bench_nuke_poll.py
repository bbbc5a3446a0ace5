"""What following a job costs inside Nuke, against a bare Redis round trip in the same run.

Each results Read's watcher polls ``Farm.status`` and turns it into a label every
``MLFARM_NUKE_POLL_INTERVAL`` seconds (2 by default) on a background thread. This measures one poll
(status read + snapshot + label) for jobs of growing size on a real Redis, as a ratio to a PING,
how much of one core (thread CPU time) a script following several such jobs would spend at the fixed
interval, and the interval the watchers actually choose (stretched to stay within POLL_CPU_BUDGET,
capped at MAX_WAIT) with its load.

Run: .venv/bin/python benchmarks/bench_nuke_poll.py [--sizes 100,1000,10000] [--reps 50] [--jobs 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mlfarm.broker.embedded import EmbeddedRedis
from mlfarm.broker.jobs import DONE, FAILED, JobSpec
from mlfarm.client import Farm
from mlfarm.nuke_submit.results import Progress, progress_label
from mlfarm.nuke_submit.watch import POLL_CPU_BUDGET, next_wait
from mlfarm.settings import Settings


def timed(fn, reps: int, clock=time.perf_counter) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls (after one warm-up call), by ``clock``."""
    fn()
    samples = []
    for _ in range(reps):
        t = clock()
        fn()
        samples.append(clock() - t)
    return statistics.median(samples)


def make_job(farm: Farm, frames: int) -> str:
    """A job two-thirds through: done and a few failed frames, the rest queued, as a watcher sees it."""
    spec = JobSpec(model="blur", input="/st/in.####.exr", output="/st/out.####.exr", frames=list(range(1, frames + 1)))
    farm.store.create(spec, unsent=False)
    done = frames * 2 // 3
    farm.store.start_frames(spec.id, spec.frames[:done], "bench")
    for f in spec.frames[:done]:
        if f % 97 == 0:
            farm.store.finish_frame(spec.id, f, FAILED, f"frame {f}: model blur: RuntimeError: bench", "bench")
        else:
            farm.store.finish_frame(spec.id, f, DONE, worker="bench")
    return spec.id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="job sizes in frames")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=20, help="results Reads followed at once, for the load figure")
    ap.add_argument("--interval", type=float, default=Settings.model_fields["nuke_poll_interval"].default)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis.start(Path(tmp) / "redis")
        try:
            farm = Farm(Settings(broker_url=server.url, storage_root=Path(tmp) / "st", data_dir=Path(tmp)), server.url)
            ping = timed(farm.redis.ping, args.reps)
            print(f"baseline: Redis PING round trip {ping * 1e3:.3f} ms (median of {args.reps})")
            print(f"{'frames':>8} {'poll ms':>9} {'x PING':>8} {'cpu ms':>7} {'status ms':>10} {'label ms':>9} "
                  f"{'core % if every ' + format(args.interval, 'g') + 's':>20} {'chosen interval s':>18} "
                  f"{'core %':>7}   ({args.jobs} jobs followed, budget {POLL_CPU_BUDGET:.0%} of a core)")
            for size in (int(s) for s in args.sizes.split(",")):
                job = make_job(farm, size)
                status_s = timed(lambda job=job: farm.status(job), args.reps)
                st = farm.status(job)
                label_s = timed(lambda st=st: progress_label(Progress.from_status(st), "2"), args.reps)
                poll = lambda job=job: progress_label(Progress.from_status(farm.status(job)), "2")  # noqa: E731
                poll_s = timed(poll, args.reps)
                cpu_s = timed(poll, args.reps, time.thread_time)  # what the watchers budget by
                fixed = 100.0 * cpu_s * args.jobs / args.interval
                chosen = next_wait(args.interval, cpu_s, args.jobs)
                load = 100.0 * cpu_s * args.jobs / chosen
                print(f"{size:>8} {poll_s * 1e3:>9.2f} {poll_s / ping:>8.1f} {cpu_s * 1e3:>7.2f} "
                      f"{status_s * 1e3:>10.2f} {label_s * 1e3:>9.3f} {fixed:>19.2f}% {chosen:>18.2f} {load:>6.2f}%")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
