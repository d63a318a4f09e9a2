"""Fixtures every integration test of the pipeline shares."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.db.engine import create_engine
from tests.integration.runtime_helpers import wipe_bus


@pytest_asyncio.fixture(loop_scope="session")
async def bus(nats_url: str) -> str:
    """The session's NATS with Esper's streams removed: each test starts empty."""
    await wipe_bus(nats_url)
    return nats_url


@pytest_asyncio.fixture(loop_scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on this test's fresh, migrated database."""
    eng = create_engine(database_url)
    yield eng
    await eng.dispose()
