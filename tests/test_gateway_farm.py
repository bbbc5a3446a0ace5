"""The MLClient gateway on the farm: a real gateway process, real Redis, real worker processes."""

from __future__ import annotations

import time

import mlclient as mc
import numpy as np
import pytest
import redis
from gateway_harness import direct_model, with_gateways

from conftest import make_plate, sample_pixels


@pytest.fixture
def gateway_farm(farm):
    """The farm harness with the gateway test models on every process's model path."""
    yield from with_gateways(farm, MLFARM_GATEWAY_SCRIPT_MODELS="scripted")


def test_inference_on_a_worker_is_pixel_exact_and_leaves_nothing_in_redis(gateway_farm):
    worker = gateway_farm.start_worker(queues="interactive,gpu,cpu")
    gw = gateway_farm.start_gateway()

    names = {m.name for m in mc.info(gw.port).r1.models}
    assert {"blur", "slow", "rowmark", "scripted"} <= names  # the catalog the worker published

    image = sample_pixels(11, 120, 68, 3)
    reply = mc.infer(gw.port, mc.model_from_info(gw.port, "blur"), [image], kernel_size=4)
    assert not reply.HasField("error"), reply.error.msg
    model = direct_model("blur")
    model.set_options({"kernel_size": 4})
    np.testing.assert_array_equal(mc.decode_image(reply.r2.images[0]), model.inference([image])[0])
    worker.wait_log("mlfarm.interactive")

    marked = mc.infer(gw.port, mc.model_from_info(gw.port, "rowmark"), [image[:20, :30]], step=0.5)
    expected = image[:20, :30] + np.arange(20, dtype=np.float32)[:, None, None] * np.float32(0.5)
    np.testing.assert_array_equal(mc.decode_image(marked.r2.images[0]), expected)
    assert {o.name for o in marked.r2.objects} == {"rows", "detections"}  # PythonScript dropped

    scripted = mc.infer(gw.port, mc.model_from_info(gw.port, "scripted"), [image[:4, :4]])
    assert scripted.r2.objects[0].values[0].string_attributes[0].values[0] == "print('scripted')"

    raw = redis.Redis.from_url(gateway_farm.url)
    assert raw.keys("mlfarm:gw:*") == []


def test_no_worker_on_the_interactive_queue_gives_a_clear_error(gateway_farm):
    gateway_farm.env_overrides["MLFARM_GATEWAY_PICKUP_TIMEOUT"] = "3"
    gateway_farm.start_worker(queues="gpu,cpu")  # publishes the catalog, never takes interactive work
    gw = gateway_farm.start_gateway()
    started = time.monotonic()
    reply = mc.infer(gw.port, mc.model_from_info(gw.port, "blur"), [sample_pixels(1, 16, 16, 3)])
    waited = time.monotonic() - started
    assert "no worker took the request for model blur within 3s" in reply.error.msg
    assert 2.5 < waited < 15
    assert redis.Redis.from_url(gateway_farm.url).keys("mlfarm:gw:*") == []
    assert gw.alive()


def test_interactive_request_is_answered_while_a_long_batch_job_fills_the_queue(gateway_farm):
    gateway_farm.start_worker(queues="interactive,gpu,cpu")
    gw = gateway_farm.start_gateway()
    blur = mc.model_from_info(gw.port, "blur")
    warm = mc.infer(gw.port, blur, [sample_pixels(3, 8, 8, 3)])  # load torch and the model first
    assert not warm.HasField("error"), warm.error.msg
    frames = list(range(1, 41))
    plate = make_plate(gateway_farm.storage / "plates", frames, width=16, height=16)
    f = gateway_farm.farm()
    job = f.submit("slow", plate, str(gateway_farm.storage / "out" / "slow.####.exr"), frames,
                   {"seconds": "0.5"}, chunk=1)  # 40 chunks, ~20 s of batch work on one worker
    deadline = time.monotonic() + 60
    while f.status(job.id).counts.get("done", 0) < 1:
        assert time.monotonic() < deadline, f.status(job.id).summary()
        time.sleep(0.1)

    image = sample_pixels(4, 64, 36, 3)
    started = time.monotonic()
    reply = mc.infer(gw.port, blur, [image], kernel_size=2)
    latency = time.monotonic() - started
    status = f.status(job.id)

    assert not reply.HasField("error"), reply.error.msg
    model = direct_model("blur")
    model.set_options({"kernel_size": 2})
    np.testing.assert_array_equal(mc.decode_image(reply.r2.images[0]), model.inference([image])[0])
    assert latency < 5.0, f"interactive frame took {latency:.1f}s behind the batch job"
    assert not status.finished and status.counts.get("queued", 0) >= 20, status.summary()
    f.cancel(job.id)


def test_an_mlclient_frame_stuck_past_its_time_limit_gets_the_reason_and_its_worker_restarts(gateway_farm):
    """A model that never returns on an artist's frame: the artist gets the reason, not a silent
    wait, and the worker ends itself (for its supervisor to restart) instead of holding every
    later request and chunk behind the stuck one."""
    from mlfarm.worker.watchdog import EXIT_HUNG

    gateway_farm.env_overrides["MLFARM_FRAME_TIME_LIMIT"] = "2"
    worker = gateway_farm.start_worker(queues="interactive,gpu,cpu")
    gw = gateway_farm.start_gateway()
    hang = mc.model_from_info(gw.port, "hang")
    fine = mc.infer(gw.port, hang, [sample_pixels(1, 16, 16, 3)])
    assert not fine.HasField("error"), fine.error.msg
    started = time.monotonic()
    reply = mc.infer(gw.port, hang, [np.full((16, 16, 3), 9.0, np.float32)])
    assert "model hang took longer than its time limit of 2s (MLFARM_FRAME_TIME_LIMIT)" in reply.error.msg, \
        reply.error.msg
    assert time.monotonic() - started < 20
    assert worker.proc.wait(30) == EXIT_HUNG
    assert "is past its time limit" in worker.log()
    assert gw.alive()


def test_concurrent_clients_through_workers(gateway_farm):
    gateway_farm.start_worker(queues="interactive,gpu,cpu")
    gateway_farm.start_worker(queues="interactive,gpu,cpu")
    gw = gateway_farm.start_gateway()
    model_msg = mc.model_from_info(gw.port, "blur")
    images = [sample_pixels(200 + i, 48, 32, 3) for i in range(8)]
    replies = mc.infer_concurrently(gw.port, model_msg, images, [{"kernel_size": 1 + i % 4} for i in range(8)])
    direct = direct_model("blur")
    for i in range(8):
        assert not replies[i].HasField("error"), replies[i].error.msg
        direct.set_options({"kernel_size": 1 + i % 4})
        np.testing.assert_array_equal(mc.decode_image(replies[i].r2.images[0]), direct.inference([images[i]])[0])


def test_relay_splits_large_images_and_keeps_pixels_out_of_the_append_only_file(redis_server, monkeypatch):
    """Frames cross Redis in parts (a Redis value holds at most 512 MB) and, being transient,
    are never written to the AOF; the small signals and a plain SET are, as a control."""
    from mlfarm.exchange import relay as relay_module
    from mlfarm.exchange.images import WireImage
    from mlfarm.exchange.relay import Relay, RelayReply, raw_redis_client

    monkeypatch.setattr(relay_module, "PART_BYTES", 1000)
    r = Relay(raw_redis_client(redis_server.url, 10))
    marker = b"PIXELMARKER-" * 400  # 4800 bytes: 5 parts
    image = WireImage(40, 10, 3, marker)
    r.put_request("aoftest", [image, WireImage(1, 1, 1, b"\x00\x00\x80?")], ttl=60, wait_ttl=60)
    assert r.client.llen(Relay.key("aoftest", "in")) == 1 + 5 + 1
    got = r.take_request("aoftest", "w1@test", heartbeat=5)
    assert [(i.width, i.height, i.channels, bytes(i.data)) for i in got.images] == [
        (40, 10, 3, marker), (1, 1, 1, b"\x00\x00\x80?")]
    assert not got.spooled and got.error is None
    assert r.take_request("aoftest", "w1@test", heartbeat=5) is None  # taken once only
    r.put_reply("aoftest", RelayReply(images=[image], objects=[{"n": 1}], worker="w1@test"))
    assert r.wait("aoftest", 1) == b"taken w1@test" and r.wait("aoftest", 1) == b"done"
    reply = r.take_reply("aoftest")
    assert bytes(reply.images[0].data) == marker and reply.objects == [{"n": 1}]

    r.client.set("control", b"CONTROLMARKER")
    time.sleep(1.5)  # appendfsync everysec
    aof = b"".join(p.read_bytes() for p in redis_server.data_dir.rglob("*") if p.is_file() and "aof" in p.name)
    assert b"CONTROLMARKER" in aof
    assert b"PIXELMARKER" not in aof
    r.client.delete("control")
