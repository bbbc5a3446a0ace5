"""The farm's model catalog as published by workers, so submitters (Nuke, the CLI, the gateway)
know every model and its options without importing torch or holding the model folders."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from mlfarm.keys import CATALOG_KEY


def publish_catalog(client: redis.Redis, descriptions: dict[str, dict[str, Any]], worker: str) -> None:
    if not descriptions:
        return
    stamp = time.time()
    client.hset(CATALOG_KEY, mapping={
        name: json.dumps({**desc, "published_by": worker, "published": stamp})  # plane order matters
        for name, desc in descriptions.items()
    })


def read_catalog(client: redis.Redis) -> dict[str, dict[str, Any]]:
    return {name: json.loads(raw) for name, raw in client.hgetall(CATALOG_KEY).items()}
