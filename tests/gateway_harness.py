"""A real `mlfarm gateway` process for the gateway tests, and the model folders they use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlfarm.broker.embedded import free_port
from mlfarm.models.catalog import Catalog, discover

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def direct_model(name: str):
    """The model as a worker would hold it, called in the test process for expected pixels."""
    model = Catalog(discover([Path(p) for p in MODELS_PATH.split(os.pathsep)])).entry(name).create()
    model.load("cpu")
    return model
