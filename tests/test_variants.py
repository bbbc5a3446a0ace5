"""A plugin's per-variant networks are built once, even when chunks ask for them at once."""

from __future__ import annotations

import threading
import time

import pytest

from mlfarm.models.variants import Variants


def test_callers_at_once_get_one_build_and_a_failed_build_is_tried_again():
    variants: Variants[object] = Variants()
    builds = []

    def build() -> object:
        builds.append(threading.current_thread().name)
        time.sleep(0.2)  # long enough that every caller arrives while the first one builds
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(variants.get("small", build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(got) == 4 and len({id(g) for g in got}) == 1
    assert variants.get("large", object) is not got[0] and len(variants) == 2

    def broken() -> object:
        raise RuntimeError("weights missing")

    with pytest.raises(RuntimeError, match="weights missing"):
        variants.get("base", broken)
    assert variants.get("base", lambda: "loaded") == "loaded"
    variants.clear()
    assert len(variants) == 0 and list(variants) == []
