"""Test tiers: unit (no services), integration (real NATS + PostgreSQL, started
by fixtures), gpu (skipped without CUDA), slow."""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytest_plugins = ["tests.fixtures.services"]


def pytest_configure(config: pytest.Config) -> None:
    # pytest's default basetemp keeps only the newest three runs per user, so a
    # second concurrent session would delete this one's live server data dirs.
    # Each session gets a private directory instead, removed when it ends.
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="esper-pytest-")
        config._esper_basetemp = config.option.basetemp  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    path = getattr(config, "_esper_basetemp", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


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
