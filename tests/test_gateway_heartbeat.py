"""A worker that dies while it serves a gateway request: the artist hears so within seconds (the
worker's heartbeat lapses), not after the frame's time limit. Real processes, a real SIGKILL."""

from __future__ import annotations

import threading
import time

import mlclient as mc
import numpy as np
import pytest
import redis
from gateway_harness import MODELS_PATH, GatewayProcess

from mlfarm.exchange.spool import FOLDER

from conftest import sample_pixels

HEARTBEAT = 1.5


@pytest.mark.parametrize("transport", ["storage", "redis"])
def test_killed_worker_is_reported_within_seconds(farm, transport):
    farm.env_overrides.update({"MLFARM_MODELS_PATH": MODELS_PATH, "MLFARM_GATEWAY_TRANSPORT": transport,
                               "MLFARM_GATEWAY_HEARTBEAT": str(HEARTBEAT)})
    worker = farm.start_worker(queues="interactive")
    gw = GatewayProcess(farm.env, farm.root / "gateway.log", local=False).wait_ready()
    client = redis.Redis.from_url(farm.url)
    try:
        slow = mc.model_from_info(gw.port, "slow")
        image = sample_pixels(8, 32, 16, 4)

        # A request that outlives several heartbeats succeeds: the worker keeps renewing it.
        started = time.monotonic()
        ok = mc.infer(gw.port, slow, [image], seconds=3 * HEARTBEAT)
        assert not ok.HasField("error"), ok.error.msg
        assert time.monotonic() - started >= 3 * HEARTBEAT
        np.testing.assert_array_equal(mc.decode_image(ok.r2.images[0]), image)

        # Killed mid-request: an error naming the worker, a few seconds after the kill.
        replies: list = []
        t = threading.Thread(target=lambda: replies.append(mc.infer(gw.port, slow, [image], seconds=25.0)))
        t.start()
        deadline = time.monotonic() + 30
        while not client.keys("mlfarm:gw:*:alive"):  # the worker has claimed it and is beating
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.05)
        time.sleep(0.5)
        killed = time.monotonic()
        worker.kill()
        t.join(60)
        waited = time.monotonic() - killed
        print(f"\nerror {waited:.2f}s after the kill: {replies[0].error.msg if replies else None}")
        message = replies[0].error.msg
        assert f"worker w1@test:{worker.proc.pid} stopped while running model slow" in message
        assert f"no heartbeat for {HEARTBEAT:g}s" in message
        # At most one heartbeat's life, plus the half-heartbeat check, plus slack for a busy machine;
        # without the heartbeat the gateway would wait the frame's time limit (300 s) plus 30 s.
        assert waited < HEARTBEAT + 4.0, waited
        assert gw.alive()
        assert client.keys("mlfarm:gw:*") == []
        folder = farm.storage / FOLDER
        assert not folder.exists() or list(folder.iterdir()) == []
    finally:
        gw.stop()
