"""A real `mlfarm gateway` process for the gateway tests, and the model folders they use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlfarm.broker.embedded import free_port
from mlfarm.models.catalog import Catalog, discover

from conftest import MlfarmProcess

TESTS = Path(__file__).resolve().parent
MODELS_PATH = os.pathsep.join([str(TESTS / "plugins"), str(TESTS / "gateway_plugins")])


class GatewayProcess(MlfarmProcess):
    def __init__(self, env: dict[str, str], log_path: Path, local: bool, log_level: str = "INFO"):
        self.port = free_port()
        super().__init__(["--log-level", log_level, "gateway", "--host", "127.0.0.1", "--port", str(self.port)]
                         + (["--local"] if local else []), env, log_path)

    def wait_ready(self, timeout: float = 60) -> GatewayProcess:
        self.wait_log("listening on", timeout)
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None


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
