"""A real `mlfarm gateway` process for the gateway tests, and the model folders they use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlfarm.broker.embedded import free_port
from mlfarm.models.catalog import Catalog, discover

from conftest import terminate

TESTS = Path(__file__).resolve().parent
MODELS_PATH = os.pathsep.join([str(TESTS / "plugins"), str(TESTS / "gateway_plugins")])


class GatewayProcess:
    def __init__(self, env: dict[str, str], log_path: Path, local: bool, log_level: str = "INFO"):
        self.port = free_port()
        self.log_path = log_path
        cmd = [sys.executable, "-m", "mlfarm", "--log-level", log_level, "gateway", "--host", "127.0.0.1",
               "--port", str(self.port)] + (["--local"] if local else [])
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not listening after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()


def local_env(root: Path, **settings: object) -> dict[str, str]:
    """The environment for a `--local` gateway of the tests: no farm, the test models, extra
    MLFARM_* settings given as keyword arguments (client_timeout=1.5 -> MLFARM_GATEWAY_CLIENT_TIMEOUT)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
    env.update({
        "MLFARM_CONFIG": str(root / "no-config.toml"),
        "MLFARM_DATA_DIR": str(root / "data"),
        "MLFARM_STORAGE_ROOT": str(root / "storage"),
        "MLFARM_MODELS_PATH": MODELS_PATH,
        "MLFARM_DEVICE": "cpu",
    })
    env.update({f"MLFARM_GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def with_gateways(farm: Any, **env: str) -> Iterator[Any]:
    """Body of a fixture: the farm harness with the gateway test models and ``farm.start_gateway()``
    starting real gateway processes in front of it (stopped at the end)."""
    farm.env_overrides["MLFARM_MODELS_PATH"] = MODELS_PATH
    farm.env_overrides.update(env)
    started: list[GatewayProcess] = []

    def start_gateway() -> GatewayProcess:
        gw = GatewayProcess(farm.env, farm.root / f"gateway{len(started)}.log", local=False)
        started.append(gw)
        return gw.wait_ready()

    farm.start_gateway = start_gateway
    yield farm
    for gw in started:
        gw.stop()


def direct_model(name: str):
    """The model as a worker would hold it, called in the test process for expected pixels."""
    model = Catalog(discover([Path(p) for p in MODELS_PATH.split(os.pathsep)])).entry(name).create()
    model.load("cpu")
    return model
