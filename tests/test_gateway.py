"""The MLClient gateway in `--local` mode: a real `mlfarm gateway` process, a client written from
the protocol description (tests/mlclient.py), pixels checked against the models called directly."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlclient as mc
import numpy as np
import pytest
from gateway_harness import GatewayProcess, direct_model, local_env

from conftest import sample_pixels

CLIENT_TIMEOUT = 1.5
MAX_BODY = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = tmp_path_factory.mktemp("gateway-local")
    env = local_env(root, client_timeout=CLIENT_TIMEOUT, max_body=MAX_BODY, script_models="scripted")
    env["PYTHONUNBUFFERED"] = "1"
    gw = GatewayProcess(env, Path(root) / "gateway.log", local=True).wait_ready()
    yield gw
    gw.stop()


def _objects(reply) -> dict[str, object]:
    return {o.name: o for o in reply.r2.objects}


def test_info_lists_every_model_with_its_options_by_type(gateway):
    reply = mc.info(gateway.port)
    assert reply.info and not reply.HasField("error")
    models = {m.name: m for m in reply.r1.models}
    assert reply.r1.num_models == len(models)
    assert {"blur", "passthrough", "slow", "rowmark", "scripted"} <= set(models)

    blur = models["blur"]
    assert blur.label == "Gaussian Blur"
    assert [(p.name, p.channels) for p in blur.inputs] == [("image", 4)]
    assert [(p.name, p.channels) for p in blur.outputs] == [("rgba", 4)]
    assert [(o.name, list(o.values)) for o in blur.int_options] == [("kernel_size", [5])]

    slow = models["slow"]
    assert [(o.name, list(o.values)) for o in slow.float_options] == [("seconds", [0.5]), ("gain", [1.0])]
    assert [(o.name, list(o.values)) for o in slow.string_options] == [("label", ["x"])]
    assert [(o.name, o.value, list(o.choices)) for o in slow.mc_options] == [("mode", "copy", ["copy", "invert"])]
    assert [(o.name, list(o.values)) for o in slow.button_options] == [("flag", [False])]
    assert [(p.name, p.channels) for p in slow.outputs] == [("rgba", 4), ("extra", 1)]


@pytest.mark.parametrize("channels", [3, 4])
def test_blur_round_trip_is_pixel_exact(gateway, channels):
    image = sample_pixels(7, 96, 54, channels)
    reply = mc.infer(gateway.port, mc.model_from_info(gateway.port, "blur"), [image], kernel_size=3)
    assert not reply.HasField("error"), reply.error.msg
    assert reply.r2.num_images == 1 and len(reply.r2.images) == 1
    out = reply.r2.images[0]
    assert (out.width, out.height, out.channels) == (96, 54, channels)

    model = direct_model("blur")
    model.set_options({"kernel_size": 3})
    expected = model.inference([image])[0]
    np.testing.assert_array_equal(mc.decode_image(out), expected)
    assert not np.array_equal(expected, image)  # the blur did something


def test_rows_travel_bottom_up_and_objects_come_back(gateway):
    image = sample_pixels(3, 16, 10, 3)
    reply = mc.infer(gateway.port, mc.model_from_info(gateway.port, "rowmark"), [image], step=2.0)
    assert not reply.HasField("error"), reply.error.msg
    got = mc.decode_image(reply.r2.images[0])
    # Top row is marked 0, bottom row 2*(H-1): a frame flipped anywhere on the way would differ.
    np.testing.assert_array_equal(got, image + np.arange(10, dtype=np.float32)[:, None, None] * np.float32(2.0))
    # The first row on the wire is the bottom row.
    wire = np.frombuffer(reply.r2.images[0].image, dtype="<f4")
    np.testing.assert_array_equal(wire[:16], image[-1, :, 0] + 18.0)

    objects = _objects(reply)
    assert reply.r2.num_objects == len(reply.r2.objects) == 2
    assert list(objects["rows"].values[0].int_attributes[0].values) == [10]
    detections = objects["detections"].values
    assert [d.string_attributes[0].values[0] for d in detections] == ["top", "bottom"]
    assert [d.float_attributes[0].values[0] for d in detections] == [0.5, 0.25]


def test_python_script_is_forwarded_only_from_allowed_models(gateway):
    image = sample_pixels(1, 8, 8, 3)
    dropped = mc.infer(gateway.port, mc.model_from_info(gateway.port, "rowmark"), [image])
    assert "PythonScript" not in _objects(dropped)
    assert "dropped a PythonScript object from model rowmark" in gateway.log()

    allowed = mc.infer(gateway.port, mc.model_from_info(gateway.port, "scripted"), [image])
    script = _objects(allowed)["PythonScript"]
    # Where the node looks: objects(0).values(0).string_attributes(0).values(0)
    assert allowed.r2.objects[0].name == "PythonScript"
    assert script.values[0].string_attributes[0].values[0] == "print('scripted')"


def test_options_reach_the_model_and_do_not_stick(gateway):
    image = sample_pixels(5, 12, 9, 4)
    model = mc.model_from_info(gateway.port, "slow")
    inverted = mc.infer(gateway.port, model, [image], seconds=0.0, gain=2.0, mode="invert", label="sh010")
    assert not inverted.HasField("error"), inverted.error.msg
    np.testing.assert_allclose(mc.decode_image(inverted.r2.images[0]), 1.0 - image * np.float32(2.0), rtol=1e-6)
    assert mc.decode_image(inverted.r2.images[1]).shape == (9, 12, 1)
    assert _objects(inverted)["label"].values[0].string_attributes[0].values[0] == "sh010"

    plain = mc.infer(gateway.port, model, [image], seconds=0.0)  # every other option at its default
    np.testing.assert_array_equal(mc.decode_image(plain.r2.images[0]), image)
    assert _objects(plain)["label"].values[0].string_attributes[0].values[0] == "x"


# --- malformed input ----------------------------------------------------------------------
def _valid_blur(port: int):
    return mc.inference_request(mc.model_from_info(port, "blur"), [sample_pixels(2, 8, 6, 3)])


def _case_payload(case: str, port: int) -> tuple[bytes, bool]:
    """(bytes to send, whether to half-close after sending)."""
    if case == "non-numeric header":
        return b"12ab45678901" + b"x" * 20, False
    if case == "negative header":
        return b"-00000000010" + b"x" * 10, False
    if case == "length above the limit":
        return str(MAX_BODY + 1).zfill(12).encode() + b"x" * 1000, False
    if case == "truncated body":
        return b"000000001000" + b"x" * 10, True
    if case == "unparseable body":
        return mc.frame(b"\xff\xff\xff\xff garbage \x00\x01"), False
    request = _valid_blur(port)
    if case == "unknown model":
        request.r2.model.name = "no_such_model"
    elif case == "image size disagrees with its shape":
        request.r2.images[0].image = request.r2.images[0].image[:-4]
    elif case == "too many channels for the model":
        request.r2.images[0].CopyFrom(mc.encode_image(sample_pixels(2, 8, 6, 5)))
    elif case == "option of the wrong type":
        del request.r2.model.int_options[:]
        request.r2.model.float_options.add(name="kernel_size", values=[3.0])
    elif case == "option out of range":
        request.r2.model.int_options[0].values[0] = 1000
    elif case == "unknown option":
        request.r2.model.int_options.add(name="radius", values=[3])
    elif case == "no image":
        del request.r2.images[:]
    elif case == "neither info nor inference":
        request = mc.MSG["RequestWrapper"](info=False)
    return mc.frame(request.SerializeToString()), False


MALFORMED = {
    "non-numeric header": "bad request header",
    "negative header": "bad request header",
    "length above the limit": "above this gateway's limit",
    "truncated body": "truncated: received 10 of 1000 bytes",
    "unparseable body": "not a valid mlserver.RequestWrapper",
    "unknown model": "unknown model 'no_such_model'",
    "image size disagrees with its shape": "carries 572 bytes",
    "too many channels for the model": "takes at most 4 channels; the image has 5",
    "option of the wrong type": "must be sent in int_options, not float_options",
    "option out of range": "above the maximum 200",
    "unknown option": "has no option 'radius'",
    "no image": "takes 1 image(s)",
    "neither info nor inference": "neither an info (r1) nor an inference (r2)",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_an_error_reply_and_the_gateway_goes_on(gateway, case):
    payload, half_close = _case_payload(case, gateway.port)
    reply = mc.parse_reply(mc.exchange(gateway.port, payload, shutdown_write=half_close))
    assert reply.HasField("error"), reply
    assert MALFORMED[case] in reply.error.msg
    assert not reply.HasField("r2")
    assert gateway.alive()
    assert mc.info(gateway.port).r1.num_models >= 5


def test_silent_client_times_out_with_an_error(gateway):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as sock:
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    waited = time.monotonic() - started
    reply = mc.parse_reply(raw)
    assert "timed out waiting for the request header" in reply.error.msg
    assert CLIENT_TIMEOUT * 0.9 <= waited < CLIENT_TIMEOUT + 5
    assert mc.info(gateway.port).r1.num_models >= 5


def test_client_that_vanishes_mid_request_does_not_hurt_the_gateway(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(b"000000100000" + b"x" * 500)
    assert mc.info(gateway.port).r1.num_models >= 5
    assert gateway.alive()


# --- several artists ---------------------------------------------------------------------------
def test_eight_concurrent_clients_each_get_their_own_result(gateway):
    model = mc.model_from_info(gateway.port, "blur")
    images = [sample_pixels(100 + i, 64, 40, 3) for i in range(8)]
    replies = mc.infer_concurrently(gateway.port, model, images, [{"kernel_size": 1 + i} for i in range(8)],
                                    start_together=True)
    direct = direct_model("blur")
    for i in range(8):
        assert not replies[i].HasField("error"), replies[i].error.msg
        direct.set_options({"kernel_size": 1 + i})
        np.testing.assert_array_equal(mc.decode_image(replies[i].r2.images[0]), direct.inference([images[i]])[0])


def test_a_slow_request_does_not_hold_up_other_clients(gateway):
    slow_model = mc.model_from_info(gateway.port, "slow")
    image = sample_pixels(9, 16, 16, 4)
    done: dict[str, float] = {}

    def slow_client() -> None:
        mc.infer(gateway.port, slow_model, [image], seconds=3.0)
        done["slow"] = time.monotonic()

    started = time.monotonic()
    t = threading.Thread(target=slow_client)
    t.start()
    time.sleep(0.3)
    blur = mc.infer(gateway.port, mc.model_from_info(gateway.port, "blur"), [sample_pixels(1, 16, 16, 3)])
    done["blur"] = time.monotonic()
    t.join(30)
    assert not blur.HasField("error")
    assert done["blur"] - started < 2.5 < done["slow"] - started


def test_a_request_in_unusual_but_valid_wire_order_is_read_as_protobuf_reads_it(gateway):
    """r2 sent in two pieces (protobuf merges them), the image's fields out of order and its
    pixels given twice (the last value wins): the gateway's pixel cutting must agree."""
    image = sample_pixels(8, 20, 12, 3)
    full = mc.inference_request(mc.model_from_info(gateway.port, "rowmark"), [image], step=3.0)
    img = full.r2.images[0]

    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2]) + mc.varint(len(payload)) + payload

    def number(field_number: int, value: int) -> bytes:
        return bytes([field_number << 3]) + mc.varint(value)

    image_fields = (field(4, b"stale pixels") + number(3, img.channels) + number(2, img.height)
                    + field(4, img.image) + number(1, img.width))
    raw = number(1, 1) + field(3, field(1, full.r2.model.SerializeToString())) + field(3, field(2, image_fields))
    check = mc.MSG["RequestWrapper"]()
    check.ParseFromString(raw)  # what protobuf itself makes of these bytes
    assert check.r2.model.name == "rowmark" and check.r2.images[0].image == img.image

    reply = mc.parse_reply(mc.exchange(gateway.port, mc.frame(raw)))
    assert not reply.HasField("error"), reply.error.msg
    expected = image + np.arange(12, dtype=np.float32)[:, None, None] * np.float32(3.0)
    np.testing.assert_array_equal(mc.decode_image(reply.r2.images[0]), expected)


def test_cli_refuses_clearly_when_it_cannot_serve(gateway, tmp_path):
    import subprocess
    import sys

    env = local_env(tmp_path)
    busy = subprocess.run([sys.executable, "-m", "mlfarm", "gateway", "--local", "--host", "127.0.0.1",
                           "--port", str(gateway.port)], env=env, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{gateway.port}" in busy.stderr

    no_farm = subprocess.run([sys.executable, "-m", "mlfarm", "gateway", "--port", "0"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert no_farm.returncode == 2
    assert "no farm to talk to" in no_farm.stderr
