"""Lock-down rules that hold before any traffic is sent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_the_embedded_redis_password_is_in_a_private_file_not_on_its_command_line(tmp_path):
    """Any local user can read a process's arguments; and redis-server took an argument starting
    with "--" (one random password in 4,096) for an option and would not start."""
    import redis

    from mlfarm.broker.embedded import EmbeddedRedis

    password = '--starts-with-dashes "quoted" back\\slash'
    server = EmbeddedRedis.start(tmp_path / "redis", password=password)
    try:
        assert redis.Redis(port=server.port, password=password).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="wrong").ping()
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert b"starts-with-dashes" not in cmdline and b"requirepass" not in cmdline
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
        generated = EmbeddedRedis.start(tmp_path / "other")
        try:
            assert all(c in "0123456789abcdef" for c in generated.password) and len(generated.password) >= 32
        finally:
            generated.stop()
    finally:
        server.stop()
