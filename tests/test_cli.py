"""The `mlfarm` command as a user runs it: real processes, real Redis, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis

from mlfarm.frames import frame_path

from conftest import PLUGINS, make_plate, sample_pixels, write_exr


def test_models_lists_catalog_with_option_specs(farm):
    proc = farm.cli("models", "--json", check=True)
    catalog = json.loads(proc.stdout)
    assert {"blur", "passthrough", "slow"} <= set(catalog)
    assert catalog["blur"]["options"] == [{"name": "kernel_size", "type": "int", "default": 5, "min": 0, "max": 200}]
    text = farm.cli("models", check=True).stdout
    assert "Gaussian Blur" in text and "kernel_size" in text and "copy, invert" in text and "0 .. 200" in text


def test_submit_wait_json_status_and_exit_codes(farm):
    farm.start_worker()
    plate = make_plate(farm.storage / "plate", range(1, 5))
    out = str(farm.storage / "out" / "o.####.exr")
    proc = farm.cli("submit", "--input", plate, "--frames", "1-4", "--model", "blur", "--option", "kernel_size=2",
                    "--output", out, "--chunk", "2", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["state"] == "done" and result["counts"]["done"] == 4 and result["failed"] == []
    assert all(os.path.exists(frame_path(out, f)) for f in range(1, 5))

    status = json.loads(farm.cli("status", result["id"], "--json", check=True).stdout)
    assert status["spec"]["options"] == {"kernel_size": 2}
    listing = farm.cli("status", check=True).stdout
    assert result["id"] in listing

    # A job with a missing frame: --wait exits non-zero with a one-line summary and the reason.
    os.remove(frame_path(plate, 2))
    proc = farm.cli("submit", "--input", plate, "--frames", "1-3", "--model", "passthrough",
                    "--output", str(farm.storage / "out2" / "o.####.exr"), "--wait")
    assert proc.returncode == 1
    assert "2/3 done, 1 failed" in proc.stdout
    assert f"frame 2: {frame_path(plate, 2)}: file not found" in proc.stdout


def test_submit_refusals_exit_2_with_a_readable_message(farm):
    plate = make_plate(farm.storage / "plate", [1])
    proc = farm.cli("submit", "--input", plate, "--frames", "1", "--model", "blur", "--option", "size=3",
                    "--output", str(farm.storage / "o.####.exr"))
    assert proc.returncode == 2
    assert "model blur has no option size (its options: kernel_size)" in proc.stderr
    proc = farm.cli("submit", "--input", plate, "--frames", "3-1", "--model", "blur",
                    "--output", str(farm.storage / "o.####.exr"))
    assert proc.returncode == 2 and "3 comes after 1" in proc.stderr
    proc = farm.cli("status", "nosuchjob")
    assert proc.returncode == 2 and "no job 'nosuchjob'" in proc.stderr


def test_cancel_and_retry_commands(farm):
    plate = make_plate(farm.storage / "plate", range(1, 5))
    out = str(farm.storage / "out" / "o.####.exr")
    job = json.loads(farm.cli("submit", "--input", plate, "--frames", "1-4", "--model", "passthrough",
                              "--output", out, "--json", check=True).stdout)["id"]
    assert "4 queued frames dropped" in farm.cli("cancel", job, check=True).stdout
    farm.start_worker()
    proc = farm.cli("retry", job, "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["done"] == 4


def _no_farm_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
    env.update({"MLFARM_DATA_DIR": str(tmp_path / "data"), "MLFARM_STORAGE_ROOT": str(tmp_path / "storage"),
                "MLFARM_CONFIG": str(tmp_path / "none.toml"), "MLFARM_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    return env


def test_no_farm_gives_a_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlfarm", "status"], env=_no_farm_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run `mlfarm up`" in proc.stderr


def test_up_runs_embedded_redis_and_a_worker_and_stops_cleanly(tmp_path):
    env = _no_farm_env(tmp_path)
    up = subprocess.Popen([sys.executable, "-m", "mlfarm", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    state_file = tmp_path / "data" / "embedded.json"
    try:
        deadline = time.monotonic() + 60
        while not state_file.exists():
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        url = json.loads(state_file.read_text())["url"]
        assert url.startswith("redis://:") and "@127.0.0.1:" in url  # password, loopback only
        assert redis.Redis.from_url(url).ping()
        plate = make_plate(tmp_path / "storage" / "plate", range(1, 4))
        # A second shell: no configuration, it finds the embedded farm by itself.
        proc = subprocess.run([sys.executable, "-m", "mlfarm", "submit", "--input", plate, "--frames", "1-3",
                               "--model", "blur", "--output", str(tmp_path / "storage" / "o" / "o.####.exr"),
                               "--wait", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "stopping workers" in output
    assert not state_file.exists()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        raise AssertionError("embedded Redis still running after mlfarm up stopped")
    except redis.ConnectionError:
        pass


def test_up_starts_a_worker_again_after_it_ended_itself_over_a_stuck_frame(tmp_path):
    """A frame stuck past MLFARM_FRAME_TIME_LIMIT ends its worker (exit 75, worker/watchdog.py):
    `mlfarm up` starts it again and keeps the farm up, where before any worker's exit stopped it."""
    env = {**_no_farm_env(tmp_path), "MLFARM_MODELS_PATH": str(PLUGINS), "MLFARM_FRAME_TIME_LIMIT": "2"}
    up = subprocess.Popen([sys.executable, "-m", "mlfarm", "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "data" / "embedded.json").exists():
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        plate = make_plate(tmp_path / "storage" / "plate", range(1, 4))
        write_exr(Path(frame_path(plate, 2)), np.full((48, 64, 4), 9.0, np.float32))
        submit = [sys.executable, "-m", "mlfarm", "submit", "--input", plate, "--frames", "1-3", "--chunk", "1",
                  "--wait", "--json"]
        stuck = subprocess.run([*submit, "--model", "hang", "--output", str(tmp_path / "storage" / "h" / "h.####.exr")],
                               env=env, capture_output=True, text=True, timeout=120)
        assert stuck.returncode == 1, stuck.stderr
        failed = json.loads(stuck.stdout)["failed"]
        assert [f["frame"] for f in failed] == [2] and "time limit of 2s" in failed[0]["reason"], failed
        write_exr(Path(frame_path(plate, 2)), sample_pixels(2))
        again = subprocess.run([*submit, "--model", "blur", "--output", str(tmp_path / "storage" / "b" / "b.####.exr")],
                               env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr  # rendered by the worker started again
        assert up.poll() is None
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "stuck past its time limit and ended; starting it again" in output, output[-3000:]


def test_demo_on_a_fresh_machine(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlfarm", "demo", "--frames", "4", "--size", "96x54"],
                          env=_no_farm_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4/4 done, 0 failed" in proc.stdout
    sheet = tmp_path / "storage" / "demo" / "contact_sheet.png"
    assert sheet.exists() and sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "storage" / "demo" / "blur").glob("plate_blur.*.exr"))) == 4
