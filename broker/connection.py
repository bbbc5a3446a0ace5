"""Where the farm's Redis is, and the rules for talking to it safely."""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mlfarm.settings import Settings

from .embedded import running_embedded_url


class NoBrokerError(RuntimeError):
    pass


class InsecureBrokerError(RuntimeError):
    pass


def is_local_host(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_broker_security(url: str) -> None:
    """A Redis reachable from other machines must have a password: the queue executes work."""
    parsed = urlparse(url)
    if parsed.scheme == "unix" or is_local_host(parsed.hostname):
        return
    if not parsed.password:
        raise InsecureBrokerError(
            f"refusing to use Redis at {parsed.hostname}:{parsed.port or 6379} without a password. "
            "Set `requirepass` in Redis and put it in the URL: "
            "MLFARM_BROKER_URL=redis://:PASSWORD@host:6379/0"
        )


def broker_url(settings: Settings) -> str:
    """The configured broker, else the embedded one that `mlfarm up` is running on this machine."""
    url = settings.broker_url or running_embedded_url(settings.embedded_state_file)
    if not url:
        raise NoBrokerError(
            "no farm to talk to: run `mlfarm up` on this machine (embedded Redis and a worker), "
            "or set MLFARM_BROKER_URL=redis://:PASSWORD@host:6379/0 for a farm's Redis"
        )
    check_broker_security(url)
    return url


def redis_client(url: str, timeout: float = 10.0, patient: bool = False, role: str = "client",
                 retries: int | None = None) -> redis.Redis:
    """A client for job records.

    Submitters fail fast (a few retries, about a second) so an artist hears at once that the farm
    is unreachable; workers are ``patient`` and ride out a Redis restart or a short outage (about a
    minute of retries with backoff) instead of failing the frames they are rendering. A client whose
    user waits on every call (Nuke's interface) passes ``retries=0``, so one ``timeout`` bounds a call
    even against a Redis that accepts connections but never answers. The connection is named
    ``mlfarm-<role>:<host>:<pid>`` so `CLIENT LIST` tells a wrangler who is who.
    """
    if retries is None:
        retries = 16 if patient else 4
    backoff = ExponentialBackoff(cap=5.0, base=0.1) if patient else ExponentialBackoff(cap=1.0, base=0.05)
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(backoff, retries=retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        client_name=f"mlfarm-{role}:{socket.gethostname()}:{os.getpid()}",
    )
