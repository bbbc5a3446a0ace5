"""`mlfarm flower`: the real Flower process on the real Redis, watching a real worker render a job.

Checked over HTTP as a wrangler's browser and Prometheus would see it: every page and API call
needs the password, a finished job's chunks are listed with readable job/name/model/frames,
/metrics counts them, and the history survives a Flower restart.
"""

from __future__ import annotations

import ast
import base64
import html
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlfarm.broker.embedded import free_port
from mlfarm.flower_monitor import FlowerConfigError, plan_flower
from mlfarm.frames import format_frames
from mlfarm.settings import Settings

from conftest import MlfarmProcess, make_plate

USER, PASSWORD = "wrangler", "s3cret-farm"


def http_get(url: str, auth: tuple[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class FlowerProcess(MlfarmProcess):
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = int(env["MLFARM_FLOWER_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        super().__init__(["--log-level", "INFO", "flower"], env, log_path)
        self.wait_for(self._answers, "an answer on /healthcheck", every=0.2)

    def _answers(self) -> bool:
        try:
            return http_get(self.base + "/healthcheck", timeout=1)[0] == 200
        except OSError:
            return False

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, str]:
        return http_get(self.base + path, auth)


@pytest.fixture
def flower_env(farm):
    farm.env_overrides.update({
        "MLFARM_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        "MLFARM_FLOWER_PORT": str(free_port()),
        "MLFARM_FLOWER_ADDRESS": "127.0.0.1",
        "MLFARM_FLOWER_SAVE_INTERVAL": "1",
    })
    return farm


def chunk_tasks(flower: FlowerProcess, job_id: str) -> dict[str, dict]:
    """One job's chunks, found the way the README tells wranglers to: search ``kwargs:job_id=ID``."""
    code, body = flower.get(f"/api/tasks?taskname=mlfarm.chunk&search=kwargs:job_id={job_id}")
    assert code == 200, body
    return json.loads(body)


def test_flower_needs_auth_lists_the_jobs_chunks_readably_and_counts_them(flower_env):
    farm = flower_env
    flower = FlowerProcess(farm.env, farm.root / "flower.log")
    try:
        for path in ("/", "/tasks", "/workers", "/api/tasks", "/api/workers"):
            assert flower.get(path, auth=None)[0] == 401, path
            assert flower.get(path, auth=(USER, "wrong"))[0] == 401, path
        assert flower.get("/")[0] == 200
        assert "--basic" not in " ".join(Path(f"/proc/{flower.proc.pid}/cmdline").read_text().split("\0"))
        assert PASSWORD not in Path(f"/proc/{flower.proc.pid}/cmdline").read_text()

        farm.start_worker(name="gpu0@farmhost")
        frames = list(range(1001, 1005))
        plate = make_plate(farm.storage / "plates" / "sh010", frames)
        out = str(farm.storage / "sh010" / "blur" / "sh010_blur.####.exr")
        spec = farm.farm().submit("blur", plate, out, frames, {"kernel_size": 2}, chunk=2, name="sh010 Read1")
        assert farm.wait_job(spec.id).state == "done"

        deadline = time.monotonic() + 30
        while True:
            tasks = chunk_tasks(flower, spec.id)
            if len(tasks) == 2 and all(t["state"] == "SUCCESS" for t in tasks.values()):
                break
            assert time.monotonic() < deadline, f"Flower shows {tasks}\n{flower.log()[-3000:]}"
            time.sleep(0.5)
        assert chunk_tasks(flower, "0" * 12) == {}  # the search does filter
        shown = sorted(ast.literal_eval(t["kwargs"])["frames"] for t in tasks.values())
        assert shown == [format_frames(frames[:2]), format_frames(frames[2:])]
        for t in tasks.values():
            assert t["name"] == "mlfarm.chunk"
            assert t["worker"] == "gpu0@farmhost"
            kwargs = ast.literal_eval(t["kwargs"])
            assert kwargs["job_id"] == spec.id and kwargs["model"] == "blur" and kwargs["name"] == "sh010 Read1"
            assert kwargs["output"] == out

        code, page = flower.get("/tasks")  # the task list shows the arguments column by default
        assert code == 200 and '<th data-column="kwargs">' in page
        query = urllib.parse.urlencode({"draw": 1, "start": 0, "length": 10, "order[0][column]": 0,
                                        "columns[0][data]": "name", "search[value]": f"kwargs:job_id={spec.id}"})
        code, body = flower.get(f"/tasks/datatable?{query}")  # the rows the browser's list is filled with
        rows = json.loads(body)["data"]
        assert code == 200 and sorted(r["kwargs"] for r in rows) == sorted(t["kwargs"] for t in tasks.values())
        uuid, task = next(iter(tasks.items()))
        code, page = flower.get(f"/task/{uuid}")  # the task's page, as a browser shows it
        assert code == 200 and "mlfarm.chunk" in page and task["kwargs"] in html.unescape(page)

        # Prometheus: Flower serves /metrics without asking for the password (documented in the README).
        code, text = flower.get("/metrics", auth=None)
        assert code == 200
        succeeded = {
            s.labels["worker"]: s.value
            for family in text_string_to_metric_families(text) if family.name == "flower_events"
            for s in family.samples
            if s.name == "flower_events_total" and s.labels.get("task") == "mlfarm.chunk"
            and s.labels.get("type") == "task-succeeded"
        }
        assert succeeded == {"gpu0@farmhost": 2.0}, text[:3000]
        assert "flower_task_runtime_seconds" in text
    finally:
        assert flower.stop() == 0, flower.log()[-3000:]

    # Persistent state: a restarted Flower still lists the finished chunks (no new events needed).
    flower = FlowerProcess(farm.env, farm.root / "flower2.log")
    try:
        tasks = chunk_tasks(flower, spec.id)
        assert len(tasks) == 2 and all(t["state"] == "SUCCESS" for t in tasks.values()), tasks
    finally:
        flower.stop()
    assert list((farm.data / "flower").iterdir()), "no Flower state saved under MLFARM_DATA_DIR/flower"


def test_flower_is_refused_without_a_password_unless_it_stays_on_this_machine(farm):
    farm.env_overrides.update({"MLFARM_BROKER_URL": "redis://:pw@redis.farm.invalid:6379/0",
                               "MLFARM_FLOWER_PORT": str(free_port())})
    proc = farm.cli("flower", timeout=60)
    assert proc.returncode == 2
    assert "refusing to start Flower without a password" in proc.stderr
    assert "MLFARM_FLOWER_BASIC_AUTH=user:password" in proc.stderr

    farm.env_overrides["MLFARM_FLOWER_ADDRESS"] = "0.0.0.0"
    proc = farm.cli("flower", timeout=60)
    assert proc.returncode == 2 and "on 0.0.0.0 without a password" in proc.stderr, proc.stderr

    farm.env_overrides["MLFARM_FLOWER_BASIC_AUTH"] = "wrangler"
    proc = farm.cli("flower", timeout=60)
    assert proc.returncode == 2 and "expected user:password" in proc.stderr, proc.stderr


def test_flower_listening_rules(tmp_path):
    def plan(broker: str, **values: object):
        return plan_flower(Settings(data_dir=tmp_path, **values), broker)

    local = "redis://:pw@127.0.0.1:6379/0"
    farm_broker = "redis://:pw@redis:6379/0"
    assert plan(local).address == "127.0.0.1" and plan(local).basic_auth is None
    assert plan(farm_broker, flower_address="127.0.0.1").address == "127.0.0.1"
    launch = plan(farm_broker, flower_basic_auth="a:b, c:d")
    assert (launch.address, launch.basic_auth) == ("0.0.0.0", "a:b,c:d")
    assert launch.db == tmp_path / "flower" / "flower.db"
    assert "--persistent=True" in launch.argv() and "a:b" not in " ".join(launch.argv())
    assert plan(farm_broker, flower_basic_auth="a:b", flower_persistent=False).db is None
    for bad in ({}, {"flower_address": "10.1.2.3"}, {"flower_basic_auth": "a:"}):
        with pytest.raises(FlowerConfigError):
            plan(farm_broker, **bad)
