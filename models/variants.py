"""What a plugin loads per variant (a size, an architecture, a set of options), once.

A warm model serves several chunks at once (``worker/sharing.py``), each with its own options, so
two chunks may ask for a variant that is not loaded yet at the same moment. Built under a lock, a
variant is loaded once, not once per chunk that asked (twice the GPU memory, and twice the time).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Variants(Generic[T]):
    def __init__(self) -> None:
        self._items: dict[Hashable, T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        """The variant ``key``, built with ``build()`` by the first caller; the others wait for it.
        A ``build`` that raises leaves nothing behind: the next caller tries again."""
        found = self._items.get(key)
        if found is None:
            with self._lock:
                found = self._items.get(key)
                if found is None:
                    found = self._items[key] = build()
        return found

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)
