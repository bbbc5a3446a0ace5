"""How an interactive request and its reply cross Redis between the gateway and a worker.

The Celery message only names the request (id, model, options: readable in Flower); the pixels
go in Redis lists with a TTL under ``mlfarm:gw:<id>:*``. A frame is tens of megabytes, and a
farm's Redis usually persists with an append-only file: written plainly, every frame would be
appended to that file (measured: a 25 MB SET takes ~170 ms with AOF against ~9 ms without). The
pixels are transient, so they are written from a Lua script that turns propagation off
(``redis.set_repl(redis.REPL_NONE)``): they live in memory only and are not appended to the AOF
or sent to replicas (an AOF rewrite while a frame is in flight snapshots it like any key; it
expires or is deleted seconds later).

With ``MLFARM_GATEWAY_TRANSPORT=storage`` the pixels go through files on shared storage
instead (:mod:`mlfarm.exchange.spool`) and these lists carry only the JSON headers; the header says
which way the pixels went, and the worker answers the same way.

Keys of one request ``<id>``:
``:in``    the request: a JSON header, then the image bytes (each image in parts of at most
           ``PART_BYTES``, under Redis's 512 MB limit on one value);
``:taken`` ``:in`` once a worker has claimed it (renamed, so the claim is one atomic step);
``:state`` signals for the gateway's BLPOP: ``taken <worker>`` when a worker starts, ``done``;
``:alive`` the worker's heartbeat while it works on the request: a key with a short TTL that it
           keeps renewing; if it lapses before ``done``, the worker died (see ``Relay.alive``);
``:wait``  exists while the gateway waits for the request, so a late worker does not leave a
           reply behind nobody collects;
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

from mlfarm.keys import GATEWAY_PREFIX, REPLY_TTL

from .images import WireImage
from .spool import Spool, SpoolError

log = logging.getLogger(__name__)

PREFIX = GATEWAY_PREFIX
PART_BYTES = 256 * 1024 * 1024
#: Values larger than this are sent by the Python packer without being copied.
_PACK_CUTOFF = 6000
TAKEN = b"taken"
DONE = b"done"

# A worker claims a request: the claim, its "taken" signal and its first heartbeat happen together,
# so a worker killed at any moment leaves either an unclaimed request or a heartbeat that lapses.
# Transient like the pixels: nothing of an interactive request goes to the AOF or replicas.
_CLAIM = """
redis.replicate_commands()
redis.set_repl(redis.REPL_NONE)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[2])
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[3])
return 1
"""

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
class RelayRequest:
    """What a worker gets when it claims a request: the images, or why they could not be read."""

    images: list[WireImage] = field(default_factory=list)
    spooled: bool = False
    error: str | None = None


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
    """Both ends of the exchange; the gateway and the worker each hold one on a raw client.

    ``spool`` is where pixels go as files: the gateway passes one to send requests that way; a
    worker passes its own and answers through it whenever a request came through it.
    """

    def __init__(self, client: redis.Redis, spool: Spool | None = None, send_spooled: bool = False):
        self.client = client
        self.spool = spool
        self.send_spooled = send_spooled and spool is not None
        self._put = client.register_script(_PUT_TRANSIENT)
        self._claim = client.register_script(_CLAIM)

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

    def _send_images(self, request_id: str, part: str, header: dict[str, Any], images: Sequence[WireImage],
                     spooled: bool, ttl: int) -> None:
        if spooled and images:
            assert self.spool is not None
            self.spool.write(request_id, part, images)
            header["images"] = [[img.width, img.height, img.channels, 0] for img in images]
            header["spool"] = True
            self._put_list(self.key(request_id, part), header, [], ttl)
            return
        header["images"], parts = _parts(images)
        self._put_list(self.key(request_id, part), header, parts, ttl)

    def _receive_images(self, request_id: str, part: str, header: dict[str, Any], items: Sequence[bytes]
                        ) -> list[WireImage]:
        if not header.get("spool"):
            return _images(header.get("images", []), items)
        if self.spool is None:
            raise SpoolError("the frame came through shared storage, but this process has no storage root")
        return self.spool.read(request_id, part, header["images"])

    # --- the gateway's side -------------------------------------------------------------
    def put_request(self, request_id: str, images: Sequence[WireImage], ttl: int, wait_ttl: int) -> None:
        """Publish the request; ``wait_ttl`` bounds how long it is waited for (``:wait``)."""
        self.client.set(self.key(request_id, "wait"), b"1", ex=max(1, int(wait_ttl)))
        self._send_images(request_id, "in", {}, images, self.send_spooled, ttl)

    def wait(self, request_id: str, timeout: float) -> bytes | None:
        """The next signal from the worker, or None after ``timeout`` seconds."""
        got = self.client.blpop([self.key(request_id, "state")], timeout=max(0.01, timeout))
        return None if got is None else got[1]

    def poll(self, request_id: str) -> bytes | None:
        """The next signal from the worker if there is one now."""
        return self.client.lpop(self.key(request_id, "state"))

    def alive(self, request_id: str) -> bool:
        """Whether the worker that took the request still beats. It deletes its heartbeat in the
        same step as it signals ``done``, so no heartbeat and no ``done`` means it died."""
        return bool(self.client.exists(self.key(request_id, "alive")))

    def withdraw(self, request_id: str) -> bool:
        """Take back a request no worker has taken; False if a worker took it meanwhile."""
        return bool(self.client.delete(self.key(request_id, "in")))

    def take_reply(self, request_id: str) -> RelayReply:
        items = self._take_list(self.key(request_id, "out"))
        if not items:
            return RelayReply(error="the worker's reply expired before the gateway could read it")
        header = json.loads(items[0])
        try:
            images = self._receive_images(request_id, "out", header, items[1:])
        except SpoolError as exc:
            return RelayReply(error=f"the gateway cannot read the worker's result: {exc}",
                              worker=header.get("worker", ""))
        return RelayReply(images, header.get("objects", []), header.get("error"), header.get("worker", ""))

    def forget(self, request_id: str) -> None:
        """Everything of the request, in Redis and on storage; the ``:wait`` key first, so that a
        worker still writing its result sees that nobody waits and removes that file itself."""
        self.client.delete(self.key(request_id, "wait"))
        self.client.delete(*(self.key(request_id, p) for p in ("in", "taken", "state", "alive", "out")))
        if self.spool is not None:
            self.spool.remove(request_id)

    # --- the worker's side ---------------------------------------------------------------
    def take_request(self, request_id: str, worker: str, heartbeat: float) -> RelayRequest | None:
        """Claim the request and start its heartbeat (``heartbeat`` seconds to live; renew it with
        ``beat``); None if the gateway gave up on it or another worker took it."""
        claimed = self._claim(
            keys=[self.key(request_id, p) for p in ("in", "taken", "state", "alive")],
            args=[TAKEN + b" " + worker.encode(), REPLY_TTL, max(1, int(heartbeat * 1000))])
        if not claimed:
            return None
        items = self._take_list(self.key(request_id, "taken"))
        if not items:
            return RelayRequest(error="the request expired in Redis before the worker could read it")
        header = json.loads(items[0])
        spooled = bool(header.get("spool"))
        try:
            return RelayRequest(self._receive_images(request_id, "in", header, items[1:]), spooled)
        except SpoolError as exc:
            return RelayRequest(spooled=False, error=str(exc))

    def beat(self, request_id: str, heartbeat: float) -> None:
        self.client.pexpire(self.key(request_id, "alive"), max(1, int(heartbeat * 1000)))

    def waited_for(self, request_id: str) -> bool:
        return bool(self.client.exists(self.key(request_id, "wait")))

    def put_reply(self, request_id: str, reply: RelayReply, spooled: bool = False) -> None:
        """Answer the way the request came; then ``done`` and the end of the heartbeat, together.

        A result nobody waits for any more is not sent: its frame would only wait for its TTL.
        """
        if not self.waited_for(request_id):
            log.info("request %s: the gateway no longer waits; result dropped", request_id)
            self.client.delete(self.key(request_id, "alive"))
            return
        header = {"objects": reply.objects, "error": reply.error, "worker": reply.worker}
        try:
            self._send_images(request_id, "out", header, reply.images, spooled, REPLY_TTL)
        except SpoolError as exc:
            header = {"objects": [], "error": f"the worker cannot write its result: {exc}", "worker": reply.worker}
            self._send_images(request_id, "out", header, [], False, REPLY_TTL)
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(self.key(request_id, "state"), DONE)
        pipe.expire(self.key(request_id, "state"), REPLY_TTL)
        pipe.delete(self.key(request_id, "alive"))
        pipe.execute()
        if spooled and self.spool is not None and not self.waited_for(request_id):
            self.spool.remove(request_id, ("out",))  # the gateway gave up while the file was being written
