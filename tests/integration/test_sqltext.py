"""The inline literals of esper.workers.sqltext read back as the values they
carry, on a real PostgreSQL, whatever standard_conforming_strings is."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from esper.infra.pgadmin import asyncpg_dsn
from esper.workers import sqltext

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

TEXTS = ["plain", "it's", "back\\slash", "\\x41", "E'\\'", "''; DROP TABLE inbox; --",
         "ünïcödé ✓", "tab\there\nnewline", ""]
BLOBS = [b"", b"\x00\x01\xff", bytes(range(256)), b"'\\"]


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_literals_read_back_exactly(database_url: str, conforming: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute(f"SET standard_conforming_strings = {conforming}")
        for value in TEXTS:
            assert await conn.fetchval(f"SELECT {sqltext.text_literal(value)}") == value
        for blob in BLOBS:
            assert await conn.fetchval(f"SELECT {sqltext.bytea_literal(blob)}") == blob
        u = uuid.uuid4()
        assert await conn.fetchval(f"SELECT {sqltext.uuid_literal(u)}") == u
    finally:
        await conn.close()

