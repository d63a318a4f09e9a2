"""The caching plane: a kernel registry keyed by cache key, in three tiers —
in-process memory → local content-addressed disk → durable store (Postgres
metadata + JetStream object store) — plus compile-once claims."""

from esper.cache.claims import (
    Claim,
    claim_compile,
    finish_claim,
    kernel_state,
    renew_claim,
    wait_for_kernel,
)
from esper.cache.disk import DiskTier
from esper.cache.durable import DurableTier
from esper.cache.keys import cache_key, current_versions
from esper.cache.memory import MemoryTier
from esper.cache.registry import KernelRegistry, LoadedKernel
from esper.cache.stats import CacheStats, format_stats

__all__ = [
    "CacheStats",
    "Claim",
    "DiskTier",
    "DurableTier",
    "KernelRegistry",
    "LoadedKernel",
    "MemoryTier",
    "cache_key",
    "claim_compile",
    "current_versions",
    "finish_claim",
    "format_stats",
    "kernel_state",
    "renew_claim",
    "wait_for_kernel",
]
