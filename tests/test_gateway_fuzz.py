"""Gateway fuzz (issue 7): thousands of malformed or random messages against a real `mlfarm gateway
--local` process, while good requests keep arriving and must come back pixel-exact.

Hypothesis draws the bodies from the protocol description (through the test-side client in
tests/mlclient.py, never the gateway's own classes): well-formed requests with absurd fields
(negative or huge sizes, wrong channel counts, unknown models and options, options in the wrong
list, NaN and infinite floats, NaN pixels), hand-encoded protobuf with arbitrary tags, varints,
lengths and wire types, and random bytes. Each body is sent framed honestly and, through a
seeded generator whose seed hypothesis also draws, as three more messages: bit-flipped, truncated,
with trailing garbage, behind a bad or huge header, cut short, or replaced by random bytes.
Meanwhile other threads send good requests and hold connections open without sending anything
(the gateway must time them out). The run is derandomized, so a failure reproduces.

Every connection must end with a well-framed reply (an Error, or a result for a request that
happened to be valid) or a clean close: never a reset, a garbled reply or silence. The gateway
process must survive, its thread count stay within its pool, its memory stay bounded.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import mlclient as mc
import numpy as np
import psutil
import pytest
from gateway_harness import GatewayProcess, direct_model, local_env
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import sample_pixels

EXAMPLES = 10_000
MAX_BODY = 1 << 20
MAX_CLIENTS = 8
CLIENT_TIMEOUT = 1.0
#: Connections held open silently at any moment, next to the fuzzing connection and the good one.
STALLERS = 3
#: RSS the gateway may gain between the warm-up and the end of the run (bodies are at most 1 MiB,
#: at most MAX_CLIENTS at once; a leak of even 1 KiB per message would exceed it).
RSS_GROWTH_LIMIT = 96 * 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("gateway-fuzz")
    env = local_env(root, client_timeout=CLIENT_TIMEOUT, max_body=MAX_BODY,
                    max_clients=MAX_CLIENTS, script_models="scripted")
    env["PYTHONUNBUFFERED"] = "1"
    # WARNING: one line per request at INFO would be 10,000 lines; warnings still show every refusal.
    gw = GatewayProcess(env, Path(root) / "gateway.log", local=True, log_level="WARNING").wait_ready()
    yield gw
    gw.stop()


# --- what the fuzzer sends ------------------------------------------------------------------------
#: Models the fuzzer may name besides random text. `slow` (which sleeps up to 30 s by option) and
#: the heavy built-ins are left out so that valid requests stay quick; every other check is the same.
KNOWN_MODELS = ("blur", "passthrough", "rowmark", "scripted")
OPTION_NAMES = st.sampled_from(("kernel_size", "step", "flag", "mode", "seconds")) | st.text(max_size=12)
INT32 = st.integers(-(2**31), 2**31 - 1)
SIZES = st.integers(1, 12) | INT32
TEXT = st.text(max_size=16)
SPECIAL = np.array([np.nan, np.inf, -np.inf, -0.0, 3.4e38, 1e-45], dtype="<f4")


def _attribs(kind: str, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(st.builds(lambda name, v: mc.MSG[kind](name=name, values=v), OPTION_NAMES,
                              st.lists(values, max_size=3)), max_size=2)


# Strategies are built once: hypothesis validates each new one, which would cost more than the draw.
MODEL_NAMES = st.sampled_from(KNOWN_MODELS) | TEXT
OPTION_LISTS = (("int_options", _attribs("IntAttrib", INT32)),
                ("float_options", _attribs("FloatAttrib", st.floats(width=32))),
                ("bool_options", _attribs("BoolAttrib", st.booleans())),
                ("button_options", _attribs("BoolAttrib", st.booleans())),
                ("string_options", _attribs("StringAttrib", TEXT)))
CHOICE_VALUES = st.sampled_from(("copy", "invert")) | TEXT
CHOICES = st.lists(TEXT, max_size=2)
CHANNELS = st.integers(1, 6) | INT32


@st.composite
def model_messages(draw: st.DrawFn):
    model = mc.MSG["Model"](name=draw(MODEL_NAMES))
    if draw(st.booleans()):
        model.label = draw(TEXT)
        model.inputs.add(name=draw(TEXT), channels=draw(INT32))
        model.outputs.add(name=draw(TEXT), channels=draw(INT32))
    for field, strategy in OPTION_LISTS:
        getattr(model, field).extend(draw(strategy))
    for _ in range(draw(st.integers(0, 1))):
        model.mc_options.add(name=draw(OPTION_NAMES), value=draw(CHOICE_VALUES), choices=draw(CHOICES))
    return model


@st.composite
def images(draw: st.DrawFn):
    """Pixels from a drawn seed (cheap, and not limited by hypothesis's example size) with NaN and
    infinities sprinkled in; the declared shape agrees with them, nearly does, or is absurd."""
    width, height, channels = draw(SIZES), draw(SIZES), draw(CHANNELS)
    count = width * height * channels if min(width, height, channels) > 0 else draw(st.integers(0, 64))
    count = min(count, 4096) + draw(st.sampled_from((0, 0, 0, 1, -1, 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pixels = rng.standard_normal(max(0, count), dtype=np.float32)
    if pixels.size and draw(st.booleans()):
        pixels[rng.integers(0, pixels.size, 4)] = rng.choice(SPECIAL, 4)
    data = pixels.astype("<f4").tobytes()[: max(0, count * 4 + draw(st.integers(-3, 0)))]
    return mc.MSG["Image"](width=width, height=height, channels=channels, image=data)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A well-formed RequestWrapper whose fields may be anything the protocol's types allow."""
    request = mc.MSG["RequestWrapper"]()
    if draw(st.booleans()):
        request.info = draw(st.booleans())
    parts = draw(st.sampled_from(("r1", "r2", "r2", "r2", "both", "neither")))
    if parts in ("r1", "both"):
        request.r1.info = draw(st.booleans())
    if parts in ("r2", "both"):
        if draw(st.integers(0, 9)):
            request.r2.model.CopyFrom(draw(model_messages()))
        request.r2.images.extend(draw(st.lists(images(), max_size=3)))
    return request.SerializeToString()


_FIELD = st.integers(1, 12) | st.integers(0, 2**29 - 1)
_FIELDS = st.recursive(
    st.tuples(_FIELD, st.sampled_from((0, 1, 2, 3, 4, 5, 6, 7)), st.integers(0, 2**64 - 1), st.binary(max_size=24)),
    lambda inner: st.tuples(_FIELD, st.just(2), st.just(0), st.lists(inner, max_size=4)),
    max_leaves=12,
)


def _encode(field: tuple) -> bytes:
    """One field in protobuf wire format, honest or not (wire types 3, 4, 6 and 7 are not valid here)."""
    number, wire_type, integer, payload = field
    key = mc.varint(number << 3 | wire_type)
    if isinstance(payload, list):
        nested = b"".join(_encode(f) for f in payload)
        return key + mc.varint(len(nested)) + nested
    if wire_type == 0:
        return key + mc.varint(integer)
    if wire_type == 1:
        return key + struct.pack("<Q", integer)
    if wire_type == 5:
        return key + struct.pack("<I", integer & 0xFFFFFFFF)
    if wire_type == 2:
        claimed = len(payload) if integer % 3 else integer  # sometimes a length that lies
        return key + mc.varint(claimed) + payload
    return key + payload


wire_bodies = st.lists(_FIELDS, max_size=6).map(lambda fields: b"".join(_encode(f) for f in fields))


#: What hypothesis draws for each example: a body, and a seed for its variants (see ``variants``).
bodies = st.one_of(requests(), requests(), wire_bodies, st.binary(max_size=256))
SEEDS = st.integers(0, 2**64 - 1)
VARIANTS = 3
BAD_HEADERS = (b"-00000000010", b" 0000000010 ", b"0x0000000010", b"+00000000010", b"1e5000000000",
               b"\xd9\xa1" * 6, b"00000000001\x00", b"000000000-01", b"\x00" * 12)


def variants(body: bytes, seed: int) -> list[tuple[str, bytes]]:
    """The body framed honestly, and ``VARIANTS`` more messages made from it by a seeded generator.

    Drawing every byte through hypothesis costs ~5 ms a message on this machine; deriving the
    framing faults (the part that needs no structure) from one drawn seed keeps 10,000 messages
    within a minute while hypothesis still chooses every body and every seed.
    """
    rng = random.Random(seed)
    out = [("framed", mc.frame(body))]
    for _ in range(VARIANTS):
        kind = rng.choice(("bit flips", "bit flips", "truncated", "trailing", "bad header", "huge header",
                           "short", "raw"))
        if kind == "bit flips":
            flipped = bytearray(body or b"\0")
            for _ in range(rng.randint(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out.append((kind, mc.frame(bytes(flipped))))
        elif kind == "truncated":
            out.append((kind, mc.frame(body + b"\0" * rng.randint(1, 1000))[: 12 + rng.randint(0, len(body))]))
        elif kind == "trailing":
            out.append((kind, mc.frame(body) + rng.randbytes(rng.randint(1, 64))))
        elif kind == "bad header":
            header = rng.choice(BAD_HEADERS) if rng.random() < 0.5 else rng.randbytes(12)
            out.append((kind, header + body))
        elif kind == "huge header":
            out.append((kind, str(rng.randint(MAX_BODY + 1, 10**12 - 1)).zfill(12).encode() + body[:64]))
        elif kind == "short":
            out.append((kind, body[: rng.randint(0, 11)]))
        else:
            out.append((kind, rng.randbytes(rng.randint(0, 300))))
    return out


# --- talking to the gateway ---------------------------------------------------------------------
def outcome(port: int, payload: bytes, half_close: bool = True, timeout: float = 20.0) -> tuple[str, object]:
    """("error" | "ok" | "closed", the reply) or, for what the gateway must never do, ("reset" |
    "garbled" | "no reply", details)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            if payload:
                sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway already replied and closed (e.g. a header over the limit): read the reply
        chunks = []
        try:
            while chunk := sock.recv(1 << 20):
                chunks.append(chunk)
        except OSError as exc:  # ECONNRESET: the gateway closed with unread data and the reply was lost
            return "reset", f"{exc} after {sum(map(len, chunks))} bytes"
        except TimeoutError:
            return "no reply", f"nothing within {timeout}s"
    raw = b"".join(chunks)
    if not raw:
        return "closed", None
    try:
        reply = mc.parse_reply(raw)
    except Exception as exc:  # framing or protobuf: either is a garbled reply
        return "garbled", f"{type(exc).__name__}: {exc}: {raw[:80]!r}"
    if reply.HasField("error"):
        return ("error", reply) if reply.error.msg and not reply.HasField("r2") else ("garbled", reply)
    if reply.HasField("r2"):
        for image in reply.r2.images:
            if len(image.image) != image.width * image.height * image.channels * 4 or not reply.r2.images:
                return "garbled", f"reply image {image.width}x{image.height}x{image.channels}: {len(image.image)} bytes"
        return "ok", reply
    return ("ok", reply) if reply.HasField("r1") else ("garbled", reply)


class Background:
    """Good requests (checked pixel for pixel), silent connections, and samples of the gateway's
    threads and memory, all while the fuzzer runs."""

    def __init__(self, gw: GatewayProcess):
        self.gw = gw
        self.proc = psutil.Process(gw.proc.pid)
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.good = 0
        self.stalled = 0
        self.max_threads = 0
        self.max_rss = 0
        blur, rowmark = mc.model_from_info(gw.port, "blur"), mc.model_from_info(gw.port, "rowmark")
        image = sample_pixels(17, 24, 16, 3)
        self.cases = [
            (mc.frame(mc.inference_request(blur, [image], kernel_size=2).SerializeToString()),
             _expected("blur", image, kernel_size=2)),
            (mc.frame(mc.inference_request(rowmark, [image], step=0.25).SerializeToString()),
             _expected("rowmark", image, step=0.25)),
        ]
        self.threads = [threading.Thread(target=self._good, daemon=True)] + [
            threading.Thread(target=self._stall, args=(i,), daemon=True) for i in range(STALLERS)]

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def sample(self) -> None:
        self.max_threads = max(self.max_threads, self.proc.num_threads())
        self.max_rss = max(self.max_rss, self.proc.memory_info().rss)

    def _good(self) -> None:
        i = 0
        while not self.stop.wait(0.05):
            payload, expected = self.cases[i % len(self.cases)]
            i += 1
            try:
                kind, reply = outcome(self.gw.port, payload, half_close=False)
                if kind != "ok":
                    self.failures.append(f"good request {i}: {kind}: {reply}")
                    continue
                got = mc.decode_image(reply.r2.images[0])
                if not np.array_equal(got, expected):
                    self.failures.append(f"good request {i}: pixels differ by up to {np.abs(got - expected).max()}")
                self.good += 1
                self.sample()
            except Exception as exc:  # the gateway died, or the check itself broke: both fail the test
                self.failures.append(f"good request {i}: {type(exc).__name__}: {exc}")

    def _stall(self, n: int) -> None:
        """Connect and send nothing, or part of a header, or a header and part of its body, then wait:
        the gateway must answer with a timeout error after MLFARM_GATEWAY_CLIENT_TIMEOUT."""
        partial = (b"", b"0000", mc.frame(b"\x08\x01" * 10)[:20])[n % 3]
        while not self.stop.is_set():
            kind, reply = outcome(self.gw.port, partial, half_close=False, timeout=CLIENT_TIMEOUT + 20)
            if kind != "error" or "timed out waiting for the request" not in reply.error.msg:
                self.failures.append(f"silent client: {kind}: {reply}")
            self.stalled += 1


def _expected(name: str, image: np.ndarray, **options: object) -> np.ndarray:
    model = direct_model(name)
    model.set_options(options)
    return model.inference([image])[0]


@pytest.mark.timeout(600)
def test_fuzzed_messages_never_stop_the_gateway(gateway):
    proc = psutil.Process(gateway.proc.pid)
    for _ in range(3):  # warm every code path that loads something (models, torch) before measuring memory
        for payload, _expected_pixels in Background(gateway).cases:
            assert outcome(gateway.port, payload)[0] == "ok"
    threads_idle, rss_warm = proc.num_threads(), proc.memory_info().rss
    outcomes: Counter[tuple[str, str]] = Counter()
    bad: list[str] = []

    @settings(max_examples=EXAMPLES // (1 + VARIANTS), deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(bodies, SEEDS)
    def one_example(body: bytes, seed: int) -> None:
        for kind, payload in variants(body, seed):
            result, detail = outcome(gateway.port, payload)
            outcomes[(kind, result)] += 1
            if result not in ("error", "ok", "closed"):
                bad.append(f"{kind} payload {payload[:120]!r}: {result}: {detail}")
        background.sample()
        assert gateway.alive(), gateway.log()[-3000:]

    started = time.monotonic()
    with Background(gateway) as background:
        one_example()
    elapsed = time.monotonic() - started
    background.sample()
    sent = sum(outcomes.values())
    summary = ", ".join(f"{k}->{r}: {n}" for (k, r), n in sorted(outcomes.items()))
    print(f"\n{sent} fuzzed messages in {elapsed:.1f}s ({summary}); {background.good} good requests and "
          f"{background.stalled} silent clients meanwhile; gateway threads {threads_idle} idle, "
          f"{background.max_threads} at most; RSS {rss_warm / 2**20:.0f} MiB warm, {background.max_rss / 2**20:.0f} "
          "MiB at most")

    assert gateway.alive(), gateway.log()[-3000:]
    assert not bad, f"{len(bad)} of {sent} connections ended badly:\n" + "\n".join(bad[:20])
    assert not background.failures, "\n".join(background.failures[:20])
    assert sent >= EXAMPLES
    assert sum(n for (_, r), n in outcomes.items() if r == "ok") > 0  # some fuzzed requests were valid ...
    assert sum(n for (_, r), n in outcomes.items() if r == "error") > sent / 2  # ... most were refused
    assert background.good >= 20 and background.stalled >= STALLERS
    # The pool's threads plus the accept loop and whatever the runtime started at warm-up; no thread per message.
    assert background.max_threads <= threads_idle + MAX_CLIENTS, (threads_idle, background.max_threads)
    assert background.max_rss - rss_warm < RSS_GROWTH_LIMIT, (rss_warm, background.max_rss)
    # And it still answers exactly, after everything.
    for payload, expected in Background(gateway).cases:
        kind, reply = outcome(gateway.port, payload)
        assert kind == "ok"
        np.testing.assert_array_equal(mc.decode_image(reply.r2.images[0]), expected)
