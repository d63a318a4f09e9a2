"""The cache key: one sha256 over everything that changes a compiled artifact —
the blueprint's canonical hash, target, dtype, backend, tool versions, codegen
options, and the artifact format itself."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import esper
from esper.artifacts.format import FORMAT_VERSION, canonical_json

# Bump when the meaning of a key's fields changes; every old key then misses.
KEY_SCHEMA = 1


def cache_key(
    *,
    blueprint_hash: str,
    target: str,
    dtype: str,
    backend: str,
    versions: Mapping[str, str],
    options: Mapping[str, Any],
) -> str:
    """sha256 hex of the canonical JSON of every field (dict order is irrelevant,
    list order is not)."""
    for name, value in (
        ("blueprint_hash", blueprint_hash),
        ("target", target),
        ("dtype", dtype),
        ("backend", backend),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(f"cache_key: {name} must be a non-empty string, got {value!r}")
    doc = {
        "schema": KEY_SCHEMA,
        "format": FORMAT_VERSION,
        "blueprint_hash": blueprint_hash,
        "target": target,
        "dtype": dtype,
        "backend": backend,
        "versions": dict(versions),
        "options": dict(options),
    }
    return hashlib.sha256(canonical_json(doc)).hexdigest()


@lru_cache(maxsize=8)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    import torch  # lazy: importing torch costs a second

    try:
        import triton

        triton_version = str(triton.__version__)
    except ImportError:
        triton_version = "none"
    return (
        ("esper", esper.__version__),
        ("torch", str(torch.__version__)),
        ("triton", triton_version),
        ("python", f"{sys.version_info.major}.{sys.version_info.minor}"),
    )


def current_versions(backend: str) -> dict[str, str]:
    """The versions of this process's toolchain that go into a cache key and an
    artifact manifest (esper, torch, triton or "none", python major.minor).

    All backends record all four: the dict shape stays one shape, and a key never
    silently survives a toolchain change."""
    if not backend:
        raise ValueError("current_versions: backend must be named")
    return dict(_installed_versions())
