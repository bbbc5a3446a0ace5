"""Lock-down rules that hold before any traffic is sent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlfarm.broker.connection import InsecureBrokerError, check_broker_security


@pytest.mark.parametrize("url", [
    "redis://redis.farm.invalid:6379/0",
    "redis://:@redis.farm.invalid:6379/0",
    "redis://user@redis.farm.invalid/0",
])
def test_remote_redis_without_password_is_refused(url):
    with pytest.raises(InsecureBrokerError, match="without a password"):
        check_broker_security(url)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0",
    "redis://localhost/0",
    "redis://[::1]:6379/0",
    "redis://:secret@redis.farm.invalid:6379/0",
    "unix:///run/redis.sock",
])
def test_local_or_authenticated_redis_is_accepted(url):
    check_broker_security(url)


@pytest.mark.parametrize("command", [["worker"], ["submit", "--input", "/s/a.####.exr", "--frames", "1",
                                                  "--model", "blur", "--output", "/s/b.####.exr"], ["status"]])
def test_commands_refuse_a_remote_redis_without_password_at_start(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFARM_")}
    env.update({"MLFARM_BROKER_URL": "redis://redis.farm.invalid:6379/0", "MLFARM_DATA_DIR": str(tmp_path),
                "MLFARM_CONFIG": str(tmp_path / "none.toml")})
    proc = subprocess.run([sys.executable, "-m", "mlfarm", *command], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "without a password" in proc.stderr and "redis://:PASSWORD@host:6379/0" in proc.stderr
