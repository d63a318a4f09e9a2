"""Cache statistics: hits, misses and rejections per tier and a lookup-latency
histogram, as Prometheus metrics and as a plain snapshot for ``esper kernels --stats``."""

from __future__ import annotations

import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

TIERS = ("memory", "disk", "durable")
# Where a lookup was answered: a tier, or nowhere.
OUTCOMES = (*TIERS, "miss")

_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


@dataclass(frozen=True)
class _Metrics:
    hits: Counter
    misses: Counter
    rejected: Counter
    lookup_seconds: Histogram


# One metric family per Prometheus registry, however many caches a process builds.
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def _metrics_for(registry: CollectorRegistry) -> _Metrics:
    with _by_registry_lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _Metrics(
                hits=Counter(
                    "esper_cache_hits", "Kernel cache hits by tier", ["tier"], registry=registry
                ),
                misses=Counter(
                    "esper_cache_misses", "Kernel cache misses by tier", ["tier"], registry=registry
                ),
                rejected=Counter(
                    "esper_cache_rejected",
                    "Cached artifacts refused by verification, by tier",
                    ["tier"],
                    registry=registry,
                ),
                lookup_seconds=Histogram(
                    "esper_cache_lookup_seconds",
                    "Kernel lookup latency by the tier that answered (or 'miss')",
                    ["outcome"],
                    buckets=_BUCKETS,
                    registry=registry,
                ),
            )
            _by_registry[registry] = found
        return found


def _percentile(sorted_values: list[float], q: float) -> float:
    # Nearest-rank percentile: no interpolation, an observed value.
    idx = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[idx]


class CacheStats:
    """Counters for one registry instance, mirrored into Prometheus."""

    def __init__(self, registry: CollectorRegistry | None = None, sample_size: int = 4096) -> None:
        m = _metrics_for(registry if registry is not None else REGISTRY)
        # Children bound once: a labelled lookup per event would cost microseconds.
        self._hit_m = {t: m.hits.labels(tier=t) for t in TIERS}
        self._miss_m = {t: m.misses.labels(tier=t) for t in TIERS}
        self._rej_m = {t: m.rejected.labels(tier=t) for t in TIERS}
        self._lat_m = {o: m.lookup_seconds.labels(outcome=o) for o in OUTCOMES}
        self.hits = dict.fromkeys(TIERS, 0)
        self.misses = dict.fromkeys(TIERS, 0)
        self.rejected = dict.fromkeys(TIERS, 0)
        self._latency: dict[str, deque[float]] = {o: deque(maxlen=sample_size) for o in OUTCOMES}
        self._counts = dict.fromkeys(OUTCOMES, 0)

    def hit(self, tier: str) -> None:
        self.hits[tier] += 1
        self._hit_m[tier].inc()

    def miss(self, tier: str) -> None:
        self.misses[tier] += 1
        self._miss_m[tier].inc()

    def reject(self, tier: str) -> None:
        self.rejected[tier] += 1
        self._rej_m[tier].inc()

    def lookup(self, outcome: str, seconds: float) -> None:
        self._counts[outcome] += 1
        self._latency[outcome].append(seconds)
        self._lat_m[outcome].observe(seconds)

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers: per-tier counts, overall hit ratio, and latency p50/p99
        (µs) over the most recent lookups answered by each tier."""
        lookups = sum(self._counts.values())
        latency: dict[str, dict[str, float]] = {}
        for outcome, samples in self._latency.items():
            values = sorted(samples)
            if values:
                latency[outcome] = {
                    "count": self._counts[outcome],
                    "p50_us": _percentile(values, 0.50) * 1e6,
                    "p99_us": _percentile(values, 0.99) * 1e6,
                }
        return {
            "lookups": lookups,
            "hit_ratio": (lookups - self._counts["miss"]) / lookups if lookups else None,
            "tiers": {
                t: {"hits": self.hits[t], "misses": self.misses[t], "rejected": self.rejected[t]}
                for t in TIERS
            },
            "latency": latency,
        }


def format_stats(snapshot: dict[str, Any]) -> str:
    """The snapshot as a small text table (for ``esper kernels --stats``)."""
    lines = [f"{'tier':<9}{'hits':>9}{'misses':>9}{'rejected':>10}{'p50 µs':>11}{'p99 µs':>11}"]
    latency = snapshot.get("latency", {})
    for tier, row in snapshot["tiers"].items():
        lat = latency.get(tier, {})
        p50 = f"{lat['p50_us']:.1f}" if lat else "-"
        p99 = f"{lat['p99_us']:.1f}" if lat else "-"
        lines.append(
            f"{tier:<9}{row['hits']:>9}{row['misses']:>9}{row['rejected']:>10}{p50:>11}{p99:>11}"
        )
    ratio = snapshot.get("hit_ratio")
    lines.append(
        f"lookups {snapshot['lookups']}, hit ratio "
        + ("-" if ratio is None else f"{100 * ratio:.1f}%")
    )
    for key in ("memory_entries", "disk", "durable"):
        if key in snapshot:
            lines.append(f"{key}: {snapshot[key]}")
    return "\n".join(lines)
