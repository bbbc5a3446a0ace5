"""Submitting from a pipeline without Nuke's interface: ``nuke -t`` runs this file.

    nuke -t /path/to/mlfarm/nuke_submit/headless.py shot.nk --node Read1 --model blur \\
        --frames 1001-1100 --option kernel_size=3 --wait --save

It opens the script, submits the named node exactly as the panel would (render-first included),
adds the results Read to the script (``--save`` keeps it), and with ``--wait`` follows the job,
exiting 0 only if every frame is done. Progress goes to stdout; ``--json`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import nuke

from mlfarm.models.options import parse_option_args

# Absolute imports: `nuke -t` runs this file as a script, not as part of its package.
from mlfarm.nuke_submit import nuke_ui
from mlfarm.nuke_submit.results import Progress, progress_label


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nuke -t headless.py", description="Submit a node of a Nuke script to mlfarm.")
    p.add_argument("script", nargs="?", help="the .nk script to open (omit when one is already open)")
    p.add_argument("--node", required=True, help="name of the node to submit, e.g. Read1")
    p.add_argument("--model", required=True)
    p.add_argument("--frames", default=None, help="e.g. 1001-1100, 1001-1100x2 (default: the node's range)")
    p.add_argument("--option", dest="options", action="append", default=[], help="NAME=VALUE, repeatable")
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--priority", type=int, default=50)
    p.add_argument("--output", default=None, help="output pattern (default: under the storage root)")
    p.add_argument("--shot", default=None)
    p.add_argument("--force", action="store_true",
                   help="render every frame, also those whose exact result is already on the storage")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.add_argument("--save", action="store_true", help="save the script with the results Read added")
    p.add_argument("--json", dest="as_json", action="store_true")
    return p


def wait(farm, read, interval: float) -> Progress:
    """Poll in this thread: ``nuke -t`` has no event loop to deliver ``executeInMainThread`` calls."""
    last = None
    while True:
        progress = Progress.from_status(farm.status(read[nuke_ui.JOB_KNOB].value()))
        nuke_ui.apply_progress(read, progress)
        if progress != last:
            print(progress_label(progress).replace("\n", "  "))
            last = progress
        if progress.finished:
            return progress
        time.sleep(interval)


def main(argv: Optional[List[str]] = None, farm=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.script:
            nuke.scriptOpen(args.script)
        node = nuke.toNode(args.node)
        if node is None:
            raise nuke_ui.PlanError("no node named %s in the script" % args.node)
        farm = farm or nuke_ui.connect()
        sub = nuke_ui.submit(node, args.model, parse_option_args(args.options), args.frames, args.chunk,
                             args.priority, args.output, args.shot, farm, watch=False, force=args.force)
    except Exception as exc:
        if not nuke_ui._user_error(exc):
            raise
        print("error: %s" % exc, file=sys.stderr)
        return 2
    if not args.as_json:
        print("job %s: %d frames of %s -> %s (results Read %s)"
              % (sub.job_id, len(sub.spec.frames), args.model, sub.spec.output, sub.read.name()))
    code = 0
    progress = None
    if args.wait:
        progress = wait(farm, sub.read, farm.settings.nuke_poll_interval)
        code = 0 if progress.state == "done" else 1
    if args.save:
        nuke.scriptSave()
    if args.as_json:
        print(json.dumps({"id": sub.job_id, "output": sub.spec.output, "read": sub.read.name(),
                          "rendered_first": sub.rendered_first,
                          "state": progress.state if progress else "queued",
                          "failed": [{"frame": f, "reason": r} for f, r in (progress.failures if progress else ())]}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
