"""How an interactive request and its reply cross Redis between the gateway and a worker.

The Celery message only names the request (id, model, options: readable in Flower); the pixels
go in Redis lists with a TTL under ``mlfarm:gw:<id>:*``. A frame is tens of megabytes, and a
farm's Redis usually persists with an append-only file: written plainly, every frame would be
appended to that file (measured: a 25 MB SET takes ~170 ms with AOF against ~9 ms without). The
pixels are transient, so they are written from a Lua script that turns propagation off
(``redis.set_repl(redis.REPL_NONE)``): they live in memory only and are not appended to the AOF
or sent to replicas (an AOF rewrite while a frame is in flight snapshots it like any key; it
expires or is deleted seconds later).

Keys of one request ``<id>``:
``:in``    the request: a JSON header, then the image bytes (each image in parts of at most
           ``PART_BYTES``, under Redis's 512 MB limit on one value);
``:state`` signals for the gateway's BLPOP: ``taken <worker>`` when a worker starts, ``done``;
``:out``   the reply, laid out like ``:in`` (its header also carries objects or an error).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from .images import WireImage

log = logging.getLogger(__name__)

PREFIX = "mlfarm:gw:"
PART_BYTES = 256 * 1024 * 1024
#: Seconds a reply waits in Redis for the gateway to collect it (it is already waiting).
REPLY_TTL = 120
#: Values larger than this are sent by the Python packer without being copied.
_PACK_CUTOFF = 6000
TAKEN = b"taken"
DONE = b"done"

# Writes the list without propagating it to the AOF or replicas (see the module docstring).
_PUT_TRANSIENT = """
redis.replicate_commands()
redis.set_repl(redis.REPL_NONE)
redis.call('DEL', KEYS[1])
for i = 2, #ARGV do
  redis.call('RPUSH', KEYS[1], ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""


def raw_redis_client(url: str, timeout: float) -> redis.Redis:
    """A binary-safe client (pixels are bytes; the job store's client decodes to str).

    Replies are parsed by hiredis (4x faster than redis-py's own parser on a 25 MB frame), but
    commands are packed by redis-py's Python packer, which sends large values as they are,
    where hiredis's packer copies them into one buffer first (measured: a 25 MB write took
    ~23 ms this way, ~76 ms with hiredis packing). ``timeout`` must exceed the longest BLPOP
    the caller makes: it bounds every socket read.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        command_packer=PythonRespSerializer(_PACK_CUTOFF, Encoder("utf-8", "strict", False).encode),
        socket_connect_timeout=10,
        socket_timeout=timeout,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError],
    )


@dataclass
class RelayReply:
    """What a worker sends back: images, or JSON-able objects, or an error for the artist."""

    images: list[WireImage] = field(default_factory=list)
    objects: list[Any] = field(default_factory=list)
    error: str | None = None
    worker: str = ""


def _parts(images: Sequence[WireImage]) -> tuple[list[list[int]], list[memoryview]]:
    shapes, parts = [], []
    for img in images:
        data = memoryview(img.data).cast("B")
        chunks = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [data]
        shapes.append([img.width, img.height, img.channels, len(chunks)])
        parts.extend(chunks)
    return shapes, parts


def _images(shapes: Sequence[Sequence[int]], parts: Sequence[bytes]) -> list[WireImage]:
    images, i = [], 0
    for width, height, channels, count in shapes:
        chunk = parts[i:i + count]
        i += count
        data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
        images.append(WireImage(int(width), int(height), int(channels), data))
    return images


class Relay:
    """Both ends of the exchange; the gateway and the worker each hold one on a raw client."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._put = client.register_script(_PUT_TRANSIENT)

    @staticmethod
    def key(request_id: str, part: str) -> str:
        return f"{PREFIX}{request_id}:{part}"

    def _put_list(self, key: str, header: dict[str, Any], parts: Sequence[Any], ttl: int) -> None:
        self._put(keys=[key], args=[max(1, int(ttl)), json.dumps(header).encode(), *parts])

    def _take_list(self, key: str) -> list[bytes]:
        pipe = self.client.pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.delete(key)
        items, _ = pipe.execute()
        return items

    def _signal(self, request_id: str, value: bytes, ttl: int) -> None:
        key = self.key(request_id, "state")
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(key, value)
        pipe.expire(key, max(1, int(ttl)))
        pipe.execute()

    # --- the gateway's side -------------------------------------------------------------
    def put_request(self, request_id: str, images: Sequence[WireImage], ttl: int) -> None:
        shapes, parts = _parts(images)
        self._put_list(self.key(request_id, "in"), {"images": shapes}, parts, ttl)

    def wait(self, request_id: str, timeout: float) -> bytes | None:
        """The next signal from the worker, or None after ``timeout`` seconds."""
        got = self.client.blpop([self.key(request_id, "state")], timeout=max(0.01, timeout))
        return None if got is None else got[1]

    def withdraw(self, request_id: str) -> bool:
        """Take back a request no worker has taken; False if a worker took it meanwhile."""
        return bool(self._take_list(self.key(request_id, "in")))

    def take_reply(self, request_id: str) -> RelayReply:
        items = self._take_list(self.key(request_id, "out"))
        if not items:
            return RelayReply(error="the worker's reply expired before the gateway could read it")
        header = json.loads(items[0])
        return RelayReply(_images(header.get("images", []), items[1:]), header.get("objects", []),
                          header.get("error"), header.get("worker", ""))

    def forget(self, request_id: str) -> None:
        self.client.delete(*(self.key(request_id, p) for p in ("in", "state", "out")))

    # --- the worker's side ---------------------------------------------------------------
    def take_request(self, request_id: str, worker: str) -> list[WireImage] | None:
        """The request's images, claimed by this worker; None if the gateway gave up on it."""
        items = self._take_list(self.key(request_id, "in"))
        if not items:
            return None
        self._signal(request_id, TAKEN + b" " + worker.encode(), REPLY_TTL)
        return _images(json.loads(items[0])["images"], items[1:])

    def put_reply(self, request_id: str, reply: RelayReply) -> None:
        shapes, parts = _parts(reply.images)
        header = {"images": shapes, "objects": reply.objects, "error": reply.error, "worker": reply.worker}
        self._put_list(self.key(request_id, "out"), header, parts, REPLY_TTL)
        self._signal(request_id, DONE, REPLY_TTL)
