"""In-process LRU tier."""

from __future__ import annotations

import threading
import time

import pytest

from esper.cache.memory import MemoryTier


def test_lru_evicts_least_recently_used() -> None:
    tier = MemoryTier(capacity=3)
    for k in "abc":
        tier.put(k, k.upper())
    assert tier.get("a") == "A"  # a is now the most recent
    tier.put("d", "D")
    assert tier.get("b") is None
    assert tier.keys() == ["c", "a", "d"]
    assert tier.evictions == 1
    tier.put("c", "C2")  # re-put refreshes, no eviction
    tier.put("e", "E")
    assert tier.keys() == ["d", "c", "e"]
    assert len(tier) == 3
    assert "a" not in tier


def test_discard_clear_and_none() -> None:
    tier = MemoryTier(capacity=2)
    tier.put("a", 1)
    tier.discard("a")
    tier.discard("missing")
    assert tier.get("a") is None
    tier.put("b", 2)
    tier.clear()
    assert len(tier) == 0
    with pytest.raises(ValueError):
        tier.put("x", None)
    with pytest.raises(ValueError):
        MemoryTier(capacity=0)


def test_thread_safety_under_contention() -> None:
    tier = MemoryTier(capacity=50)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(5000):
                key = f"k{(seed * 7 + i) % 120}"
                if tier.get(key) is None:
                    tier.put(key, i + 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(tier) == 50 == len(set(tier.keys()))


def test_hit_is_fast() -> None:
    tier = MemoryTier(capacity=1024)
    for i in range(1024):
        tier.put(f"{i:064x}", object())
    key = f"{512:064x}"
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        tier.get(key)
    per_hit = (time.perf_counter() - t0) / n
    assert per_hit < 5e-6, f"{per_hit * 1e6:.2f} µs per hit"
