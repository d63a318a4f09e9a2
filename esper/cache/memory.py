"""Tier 1: an in-process LRU of loaded kernels (whatever the loader returned),
keyed by cache key. O(1) and thread-safe; a hit takes well under a microsecond."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class MemoryTier:
    """A bounded LRU map from cache key to a loaded kernel object."""

    name = "memory"

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError(f"MemoryTier capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, cache_key: str) -> Any | None:
        with self._lock:
            value = self._items.get(cache_key)
            if value is not None:
                self._items.move_to_end(cache_key)
            return value

    def put(self, cache_key: str, value: Any) -> None:
        if value is None:
            raise ValueError("MemoryTier cannot hold None (it means a miss)")
        with self._lock:
            self._items[cache_key] = value
            self._items.move_to_end(cache_key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self.evictions += 1

    def discard(self, cache_key: str) -> None:
        with self._lock:
            self._items.pop(cache_key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, cache_key: object) -> bool:
        return cache_key in self._items
