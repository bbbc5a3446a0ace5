"""The TCP server the MLClient node connects to: one request per connection.

Framing (the node's, byte for byte): the client sends a 12-byte ASCII decimal body length,
zero-padded, then a serialized ``RequestWrapper``; the server replies with a 12-byte header
holding 12 + the reply's length, then a serialized ``RespondWrapper``, and closes.

Concurrency is one thread per connection from a bounded pool. The work of a request is socket
I/O, protobuf parsing, numpy copies, Redis round trips and model calls, all of which release
the GIL, and ``--local`` model calls block anyway, so threads give real overlap without the
asyncio plumbing that every one of those blocking calls would need.

Nothing a client sends may stop the gateway: every request is handled inside one try block,
refusals are ``Error`` replies, and a connection that cannot take a reply is closed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mlfarm.exchange.images import ImageError
from mlfarm.settings import Settings

from . import mlserver_pb2 as pb
from .backends import Backend, InferenceFailed
from .messages import (
    RequestError,
    error_reply,
    inference_reply,
    info_reply,
    parse_request,
    request_images,
    request_options,
    requested_model,
)

log = logging.getLogger(__name__)

HEADER_BYTES = 12
_RECV_CHUNK = 64 * 1024 * 1024
_DRAIN_SECONDS = 1.0


class ClientError(Exception):
    """The connection itself went wrong (bad header, silence, truncation): reply and close."""


@dataclass
class GatewayConfig:
    host: str
    port: int
    max_body: int
    client_timeout: float
    max_clients: int
    script_models: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings, host: str | None = None, port: int | None = None) -> GatewayConfig:
        scripts = frozenset(m.strip() for m in settings.gateway_script_models.split(",") if m.strip())
        return cls(host or settings.gateway_host, settings.gateway_port if port is None else port,
                   settings.gateway_max_body, settings.gateway_client_timeout, settings.gateway_max_clients, scripts)


def _recv_exact(conn: socket.socket, n: int, what: str) -> bytearray:
    """Read exactly ``n`` bytes; memory grows with what arrives, not with what the header claims."""
    chunks: list[bytearray] = []
    got = 0
    while got < n:
        chunk = bytearray(min(_RECV_CHUNK, n - got))
        view = memoryview(chunk)
        filled = 0
        while filled < len(chunk):
            try:
                k = conn.recv_into(view[filled:])
            except TimeoutError:
                raise ClientError(f"timed out waiting for the {what}: received {got + filled} of {n} bytes") from None
            if k == 0:
                raise ClientError(f"the {what} is truncated: received {got + filled} of {n} bytes")
            filled += k
        chunks.append(chunk)
        got += filled
    return chunks[0] if len(chunks) == 1 else bytearray().join(chunks)


def parse_header(header: bytes, max_body: int) -> int:
    text = header.decode("ascii", errors="replace")
    if not text.isdigit():
        raise ClientError(f"bad request header {text!r}: expected the body length as 12 decimal digits")
    length = int(text)
    if length > max_body:
        raise ClientError(f"the request is {length} bytes, above this gateway's limit of {max_body} bytes "
                          "(MLFARM_GATEWAY_MAX_BODY)")
    return length


Body = list[bytes | bytearray | memoryview]


def frame_reply(body: Body) -> Body:
    """The reply's pieces behind the 12-byte header that holds 12 + the body's length."""
    length = sum(len(piece) for piece in body)
    return [f"{HEADER_BYTES + length:0{HEADER_BYTES}d}".encode("ascii"), *body]


class Gateway:
    def __init__(self, backend: Backend, config: GatewayConfig):
        self.backend = backend
        self.config = config
        self._listener: socket.socket | None = None
        self._pool = ThreadPoolExecutor(config.max_clients, thread_name_prefix="mlfarm-gateway")
        self._stopping = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------
    def bind(self) -> tuple[str, int]:
        listener = socket.create_server((self.config.host, self.config.port), backlog=128, reuse_port=False)
        self._listener = listener
        return listener.getsockname()[:2]

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        self._listener.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # e.g. out of file descriptors under a flood: wait, keep serving
                if self._stopping.is_set():
                    break
                log.warning("accept failed: %s", exc)
                time.sleep(0.1)
                continue
            self._pool.submit(self._serve_connection, conn, peer)

    def stop(self) -> None:
        """Ask serve_forever to return (safe from a signal handler)."""
        self._stopping.set()

    def shutdown(self) -> None:
        """Stop accepting; requests in progress finish."""
        self._stopping.set()
        self._pool.shutdown(wait=True)
        if self._listener is not None:
            self._listener.close()
        self.backend.close()

    # --- one connection ------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket, peer: tuple) -> None:
        started = time.perf_counter()
        try:
            conn.settimeout(self.config.client_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                header = _recv_exact(conn, HEADER_BYTES, "request header")
                body = _recv_exact(conn, parse_header(bytes(header), self.config.max_body), "request body")
            except ClientError as exc:
                log.warning("client %s:%s: %s", peer[0], peer[1], exc)
                self._send(conn, [error_reply(str(exc)).SerializeToString()])
                self._drain(conn)
                return
            reply, error = self.respond(body)
            del body
            self._send(conn, reply)
            self._drain(conn)
            log.info("client %s:%s: %s in %.1f ms", peer[0], peer[1], f"error: {error}" if error else "ok",
                     (time.perf_counter() - started) * 1000)
        except Exception:  # a broken socket or a bug: this connection ends, the gateway goes on
            log.exception("client %s:%s: connection failed", peer[0], peer[1])
        finally:
            conn.close()

    def _send(self, conn: socket.socket, body: Body) -> None:
        pieces = frame_reply(body)
        try:
            # The header and the small pieces go out together; pixel pieces without a copy.
            pending = bytearray()
            for piece in pieces:
                if len(piece) < 65536:
                    pending += piece
                    continue
                if pending:
                    conn.sendall(pending)
                    pending = bytearray()
                conn.sendall(piece)
            if pending:
                conn.sendall(pending)
        except OSError as exc:
            log.warning("could not send the reply: %s", exc)

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        """Read what the client is still sending for a moment, so closing does not reset the
        connection before it has read the reply (closing a socket with unread data sends a reset,
        and the client's kernel then drops the reply it has not read yet: found by the fuzz test
        with bytes sent past the header's length). A client that reads its reply and closes, as
        the node does, ends the wait at once."""
        try:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(0.1)
            deadline = time.monotonic() + _DRAIN_SECONDS
            while time.monotonic() < deadline and conn.recv(1 << 20):
                pass
        except OSError:
            pass

    # --- one request --------------------------------------------------------------------------
    def respond(self, body: bytes | bytearray) -> tuple[Body, str | None]:
        """The serialized reply to one request body, and its error message if it is one; never raises."""
        try:
            request, pixels = parse_request(body)
            if request.HasField("r2"):
                return self._inference(request, pixels), None
            if request.HasField("r1") or request.info:
                return [info_reply(self.backend.describe_all()).SerializeToString()], None
            raise RequestError("the request has neither an info (r1) nor an inference (r2) part")
        except (RequestError, ImageError, InferenceFailed) as exc:
            message = str(exc)
        except Exception as exc:
            log.exception("request failed")
            message = f"gateway error: {type(exc).__name__}: {exc}"
        return [error_reply(message).SerializeToString()], message

    def _inference(self, request: pb.RequestWrapper, pixels: list[memoryview]) -> Body:
        name = requested_model(request)
        descriptions = self.backend.describe_all()
        desc = descriptions.get(name)
        if desc is None:
            raise RequestError(f"unknown model {name!r} (available: {', '.join(sorted(descriptions)) or 'none'})")
        options = request_options(desc, request.r2.model)
        images = request_images(desc, request, pixels)
        result = self.backend.infer(name, options, images)
        return inference_reply(name, result.images, result.objects, self.config.script_models)
