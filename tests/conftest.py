"""Test tiers: unit (no services), integration (real NATS + PostgreSQL, started
by fixtures), gpu (skipped without CUDA), slow."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.services"]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
