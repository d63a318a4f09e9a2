"""Alembic migrations on a real PostgreSQL: upgrade an empty database, match the
models exactly, serve ``kernel_history``, downgrade to nothing and upgrade again."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.cli import main as cli_main
from esper.db import migrate
from esper.db.engine import create_engine, session_factory
from esper.db.models import Base, Blueprint, Kernel, KernelEvent
from esper.db.views import kernel_history
from esper.settings import get_settings

pytestmark = pytest.mark.integration

TABLES = set(Base.metadata.tables)
VIEW_COLUMNS = {
    "kernel_id", "blueprint_hash", "blueprint_name", "event", "status", "target",
    "backend", "dtype", "cache_key", "correlation_id", "at", "detail",
}  # fmt: skip


def _head() -> str:
    head = ScriptDirectory.from_config(migrate.alembic_config("unused")).get_current_head()
    assert head is not None
    return head


async def _relations(engine: AsyncEngine) -> tuple[set[str], set[str]]:
    async with engine.connect() as conn:
        tables = set(
            (
                await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalars()
        )
        views = set(
            (
                await conn.execute(
                    text("SELECT viewname FROM pg_views WHERE schemaname = 'public'")
                )
            ).scalars()
        )
    return tables - {"alembic_version"}, views


async def test_upgrade_downgrade_upgrade_on_empty_database(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        assert await _relations(engine) == (set(), set())
        assert await migrate.current(empty_database_url) is None

        await migrate.upgrade(empty_database_url)
        assert await migrate.current(empty_database_url) == _head()
        tables, views = await _relations(engine)
        assert tables == TABLES
        assert views == {"kernel_history"}

        # The migration creates exactly what the models declare (columns,
        # types, defaults, indexes, constraints): autogenerate finds nothing.
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
        assert diff == []

        await migrate.downgrade(empty_database_url, "base")
        assert await migrate.current(empty_database_url) is None
        assert await _relations(engine) == (set(), set())

        await migrate.upgrade(empty_database_url)
        assert await _relations(engine) == (TABLES, {"kernel_history"})
    finally:
        await engine.dispose()


async def _seed(engine: AsyncEngine) -> tuple[uuid.UUID, uuid.UUID]:
    """One blueprint; a kernel compiled then rejected, and one with no events yet."""
    kernel_id, idle_id = uuid.uuid4(), uuid.uuid4()
    async with session_factory(engine).begin() as s:
        s.add(Blueprint(hash="b" * 64, name="residual_mlp", ir={"nodes": []}))
        await s.flush()
        s.add_all(
            [
                Kernel(
                    id=kernel_id, blueprint_hash="b" * 64, cache_key="k" * 64,
                    target="sm_90", dtype="float32", backend="triton", status="rejected",
                    timings={"compile_ms": 12.5}, error="max abs error 0.3 > 1e-3",
                ),
                Kernel(
                    id=idle_id, blueprint_hash="b" * 64, cache_key="i" * 64,
                    target="cpu", dtype="float32", backend="torch", status="claimed",
                ),
            ]
        )  # fmt: skip
        await s.flush()
        for event, status, detail in (
            ("claimed", "claimed", {}),
            ("compiled", "compiled", {"compile_ms": 12.5}),
            ("rejected", "rejected", {"reason": "max abs error 0.3 > 1e-3"}),
        ):
            s.add(
                KernelEvent(
                    kernel_id=kernel_id, event=event, status=status,
                    correlation_id="journey-1", detail=detail,
                )
            )  # fmt: skip
            await s.flush()  # distinct ids, in order
    return kernel_id, idle_id


async def test_kernel_history_has_one_row_per_event(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        kernel_id, _ = await _seed(engine)
        async with engine.connect() as conn:
            query = select(kernel_history).order_by(kernel_history.c.at, kernel_history.c.event_seq)
            rows = [r._asdict() for r in await conn.execute(query)]
        assert set(rows[0]) >= VIEW_COLUMNS
        assert set(rows[0]) == set(kernel_history.c.keys())  # the construct matches the view
        assert [r["event"] for r in rows] == ["claimed", "compiled", "rejected"]
        assert {r["kernel_id"] for r in rows} == {kernel_id}  # no events: no rows
        last = rows[-1]
        assert last["blueprint_name"] == "residual_mlp"
        assert last["blueprint_hash"] == "b" * 64
        assert (last["target"], last["backend"], last["dtype"]) == ("sm_90", "triton", "float32")
        assert last["kernel_status"] == "rejected"
        assert last["correlation_id"] == "journey-1"
        assert last["detail"] == {"reason": "max abs error 0.3 > 1e-3"}
        assert rows[1]["detail"]["compile_ms"] == 12.5
    finally:
        await engine.dispose()


async def test_documented_queries_run_and_answer(database_url: str) -> None:
    """Every ```sql block of docs/SQL.md runs on the schema and finds the seeded facts."""
    doc = (migrate.MIGRATIONS_DIR.parent / "docs" / "SQL.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 5
    engine = create_engine(database_url)
    try:
        kernel_id, _ = await _seed(engine)
        answers = []
        async with engine.connect() as conn:
            for block in blocks:
                # psql's :'blueprint' variable, as a user would \set it (a hash prefix).
                sql = text(block.replace(":'blueprint'", "'bbbb'"))
                answers.append([r._asdict() for r in await conn.execute(sql)])
    finally:
        await engine.dispose()
    fate, story, rejections, dead, percentiles = answers
    fates = {r["kernel_id"]: (r["fate"], r["journey"]) for r in fate}
    assert fates.pop(kernel_id) == ("rejected", "claimed -> compiled -> rejected")
    assert list(fates.values()) == [("claimed", None)]
    assert [r["event"] for r in story] == ["claimed", "compiled", "rejected"]
    assert [r["why"] for r in rejections] == ["max abs error 0.3 > 1e-3"]
    assert dead == []
    assert [(r["backend"], r["kernels"], float(r["p50_ms"])) for r in percentiles] == [
        ("triton", 1, 12.5)
    ]


def test_esper_db_cli_upgrades_and_downgrades(
    empty_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("ESPER_HOME", str(tmp_path))
    monkeypatch.setenv("ESPER_DATABASE_URL", empty_database_url)
    monkeypatch.delenv("ESPER_NATS_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert cli_main(["db", "upgrade"]) == 0
        assert capsys.readouterr().out.strip() == _head()
        assert cli_main(["db", "downgrade", "base"]) == 0
        assert capsys.readouterr().out.strip() == "base"
        assert cli_main(["db", "upgrade", "--revision", _head()]) == 0
        assert cli_main(["db", "current"]) == 0
        assert capsys.readouterr().out.split() == [_head(), _head()]
    finally:
        get_settings.cache_clear()


def test_esper_db_cli_without_endpoints_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("ESPER_HOME", str(tmp_path))
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert cli_main(["db", "upgrade"]) == 2
        assert "esper up" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
