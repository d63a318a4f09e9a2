"""Run the Alembic migrations in ``migrations/`` from code (``esper db upgrade``,
``esper up``, test fixtures) on one async connection."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import pool
from sqlalchemy.engine import Connection

import esper
from esper.db.engine import create_engine
from esper.errors import ConfigError

MIGRATIONS_DIR = Path(esper.__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url``. The URL travels in ``attributes``, not in
    the ini options, where ``%`` in a password would be read as interpolation."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise ConfigError(f"Alembic migrations not found in {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    return cfg


async def _run(url: str, action: str, revision: str) -> None:
    cfg = alembic_config(url)
    engine = create_engine(url, poolclass=pool.NullPool)

    def run(connection: Connection) -> None:
        # env.py sees the connection and runs on it instead of opening its own.
        cfg.attributes["connection"] = connection
        getattr(command, action)(cfg, revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``."""
    await _run(url, "upgrade", revision)


async def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``base``: empty)."""
    await _run(url, "downgrade", revision)


async def current(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: MigrationContext.configure(c).get_current_revision()
            )
    finally:
        await engine.dispose()
