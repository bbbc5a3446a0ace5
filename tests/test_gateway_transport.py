"""How the gateway's frames reach a worker (MLFARM_GATEWAY_TRANSPORT): through Redis, or as files
in a hidden folder of the storage root. Real gateway and worker processes, real Redis, real files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlclient as mc
import numpy as np
import pytest
import redis
from gateway_harness import direct_model, with_gateways

from mlfarm.exchange.images import WireImage
from mlfarm.exchange.relay import Relay, RelayReply, raw_redis_client
from mlfarm.exchange.spool import FOLDER, Spool, SpoolError

from conftest import sample_pixels


@pytest.fixture
def gw_farm(farm):
    """The farm harness with the gateway test models, and gateways started on demand."""
    yield from with_gateways(farm)


def spool_files(storage: Path) -> list[str]:
    folder = storage / FOLDER
    return sorted(os.listdir(folder)) if folder.exists() else []


def redis_bytes_in(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


@pytest.mark.parametrize("transport", ["redis", "storage"])
def test_each_transport_is_pixel_exact_and_leaves_nothing_behind(gw_farm, transport):
    gw_farm.env_overrides["MLFARM_GATEWAY_TRANSPORT"] = transport
    gw_farm.start_worker(queues="interactive,gpu,cpu")
    gw = gw_farm.start_gateway()
    client = redis.Redis.from_url(gw_farm.url)

    image = sample_pixels(21, 256, 256, 3)  # 786 KB each way
    blur = mc.model_from_info(gw.port, "blur")
    assert not mc.infer(gw.port, blur, [image[:8, :8]]).HasField("error")  # the worker loads torch first
    before = redis_bytes_in(client)
    reply = mc.infer(gw.port, blur, [image], kernel_size=4)
    into_redis = redis_bytes_in(client) - before
    assert not reply.HasField("error"), reply.error.msg
    model = direct_model("blur")
    model.set_options({"kernel_size": 4})
    np.testing.assert_array_equal(mc.decode_image(reply.r2.images[0]), model.inference([image])[0])
    # The frame crosses Redis twice (request in, result in) through Redis, and not at all through storage.
    if transport == "redis":
        assert into_redis > 2 * image.nbytes
    else:
        assert into_redis < image.nbytes / 8

    # Two output images of different channel counts, laid one after the other in one file or list.
    slow = direct_model("slow")
    slow.set_options({"seconds": 0.0, "gain": 2.0})
    expected_rgba, expected_extra, _ = slow.inference([image[:40, :60]])
    two = mc.infer(gw.port, mc.model_from_info(gw.port, "slow"), [image[:40, :60]], seconds=0.0, gain=2.0)
    assert not two.HasField("error"), two.error.msg
    np.testing.assert_array_equal(mc.decode_image(two.r2.images[0]), expected_rgba)
    np.testing.assert_array_equal(mc.decode_image(two.r2.images[1]), expected_extra)

    failed = mc.infer(gw.port, mc.model_from_info(gw.port, "broken"), [image[:16, :16]])
    assert "model broken failed on worker w1@test" in failed.error.msg
    assert "broken on purpose" in failed.error.msg

    assert client.keys("mlfarm:gw:*") == []
    assert spool_files(gw_farm.storage) == []
    if transport == "redis":
        assert not (gw_farm.storage / FOLDER).exists()  # nothing was ever written to storage


def test_a_worker_that_cannot_see_the_frame_files_says_so(gw_farm, tmp_path):
    gw_farm.env_overrides["MLFARM_GATEWAY_TRANSPORT"] = "storage"
    elsewhere = tmp_path / "another-mount"
    elsewhere.mkdir()
    gw_farm.env_overrides["MLFARM_STORAGE_ROOT"] = str(elsewhere)
    gw_farm.start_worker(queues="interactive")
    del gw_farm.env_overrides["MLFARM_STORAGE_ROOT"]
    gw = gw_farm.start_gateway()

    reply = mc.infer(gw.port, mc.model_from_info(gw.port, "blur"), [sample_pixels(3, 32, 16, 3)])
    message = reply.error.msg
    assert "failed on worker w1@test" in message
    assert f"{FOLDER}/" in message and "does not exist here" in message
    assert f"MLFARM_STORAGE_ROOT (this process: {elsewhere})" in message
    assert spool_files(gw_farm.storage) == [] and spool_files(elsewhere) == []
    assert redis.Redis.from_url(gw_farm.url).keys("mlfarm:gw:*") == []
    assert gw.alive()


def test_frame_files_are_removed_when_no_worker_takes_the_request(gw_farm):
    gw_farm.env_overrides.update({"MLFARM_GATEWAY_TRANSPORT": "storage", "MLFARM_GATEWAY_PICKUP_TIMEOUT": "2"})
    gw_farm.start_worker(queues="gpu,cpu")  # publishes the catalog, never takes interactive work
    gw = gw_farm.start_gateway()
    reply = mc.infer(gw.port, mc.model_from_info(gw.port, "blur"), [sample_pixels(3, 32, 16, 3)])
    assert "no worker took the request for model blur within 2s" in reply.error.msg
    assert (gw_farm.storage / FOLDER).is_dir()  # the frame was written there ...
    assert spool_files(gw_farm.storage) == []  # ... and removed
    assert redis.Redis.from_url(gw_farm.url).keys("mlfarm:gw:*") == []


def test_gateway_sweeps_frame_files_that_dead_processes_left(gw_farm):
    gw_farm.env_overrides["MLFARM_GATEWAY_TRANSPORT"] = "storage"
    folder = gw_farm.storage / FOLDER
    folder.mkdir()
    stale = [folder / ("a" * 32 + ".in"), folder / ("b" * 32 + ".out"), folder / (".cccc.out.partial-1234")]
    for path in stale:
        path.write_bytes(b"\0" * 16)
        os.utime(path, (time.time() - 86400,) * 2)
    recent = folder / ("d" * 32 + ".in")  # a request of another gateway, in flight
    recent.write_bytes(b"\0" * 16)
    gw_farm.start_worker(queues="gpu")
    gw_farm.start_gateway()  # sweeps at start (then every minute)
    assert spool_files(gw_farm.storage) == [recent.name]


def test_a_result_the_gateway_gave_up_on_is_not_left_behind(redis_server, tmp_path):
    """The gateway's and the worker's ends of the storage transport, in this process, in each order
    the gateway's giving up (``forget``) and the worker's late result can come."""
    gateway = Relay(raw_redis_client(redis_server.url, 10), Spool(tmp_path), send_spooled=True)
    worker = Relay(raw_redis_client(redis_server.url, 10), Spool(tmp_path))
    frame = WireImage.from_array(sample_pixels(5, 24, 16, 3))

    # The gateway gives up before the worker answers: the result is dropped, nothing is written.
    gateway.put_request("1" * 32, [frame], ttl=60, wait_ttl=60)
    request = worker.take_request("1" * 32, "w@test", heartbeat=5)
    assert request.spooled and bytes(request.images[0].data) == bytes(frame.data)
    gateway.forget("1" * 32)
    worker.put_reply("1" * 32, RelayReply(images=[frame], worker="w@test"), spooled=True)
    assert spool_files(tmp_path) == []
    assert gateway.client.keys("mlfarm:gw:*") == []

    # The usual order: the gateway reads the result file (mapped), then removes it while still
    # holding the mapping; the pixels stay readable until it lets go.
    gateway.put_request("2" * 32, [frame], ttl=60, wait_ttl=60)
    worker.take_request("2" * 32, "w@test", heartbeat=5)
    worker.put_reply("2" * 32, RelayReply(images=[frame], worker="w@test"), spooled=True)
    assert gateway.wait("2" * 32, 1).startswith(b"taken") and gateway.wait("2" * 32, 1) == b"done"
    assert not gateway.alive("2" * 32)  # the heartbeat ends with the result
    reply = gateway.take_reply("2" * 32)
    gateway.forget("2" * 32)
    assert spool_files(tmp_path) == []
    assert bytes(reply.images[0].data) == bytes(frame.data)


def test_frame_file_names_cannot_leave_the_spool_folder(tmp_path):
    spool = Spool(tmp_path / "storage")
    for bad in ("../../etc/passwd", "a" * 31, "A" * 32, "a" * 32 + "/x"):
        with pytest.raises(SpoolError, match="refused"):
            spool.path(bad, "in")
    with pytest.raises(SpoolError, match="refused"):
        spool.path("a" * 32, "../in")
    # A spool folder that is a symlink out of the storage root is refused too.
    (tmp_path / "storage").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "storage" / FOLDER).symlink_to(tmp_path / "outside")
    with pytest.raises(OSError, match="outside the storage root"):
        spool.write("a" * 32, "in", [WireImage(1, 1, 1, b"\0\0\0\0")])
    assert os.listdir(tmp_path / "outside") == []
