"""Database-level administration (create, drop, copy from a template) over a
raw asyncpg connection: these statements cannot run inside a transaction."""

from __future__ import annotations

import re

import asyncpg
from sqlalchemy.engine import make_url

from esper.db.engine import async_url

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database."""
    return make_url(async_url(url)).set(database=database).render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """A libpq-style DSN asyncpg accepts (``host=/socket/dir`` stays a query parameter)."""
    return make_url(async_url(url)).set(drivername="postgresql").render_as_string(
        hide_password=False
    )


def _ident(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    return f'"{name}"'


async def create_database(admin_url: str, name: str, *, template: str | None = None) -> str:
    """CREATE DATABASE ``name`` (a copy of ``template`` if given); returns its URL.
    ``admin_url`` names any database on the server, e.g. ``postgres``."""
    sql = f"CREATE DATABASE {_ident(name)}"
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        if template is not None:
            sql += f" TEMPLATE {_ident(template)}"
            if conn.get_server_version().major >= 15:
                # FILE_COPY copies the template's files instead of WAL-logging
                # each page: as fast for small databases, and cheaper to drop.
                sql += " STRATEGY FILE_COPY"
        await conn.execute(sql)
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def seal_template(admin_url: str, name: str) -> None:
    """Forbid connections to a template database: a stray one (autovacuum
    included) makes every CREATE DATABASE ... TEMPLATE wait for it."""
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(f"ALTER DATABASE {_ident(name)} WITH ALLOW_CONNECTIONS false")
    finally:
        await conn.close()


async def drop_database(admin_url: str, name: str) -> None:
    """DROP DATABASE IF EXISTS, disconnecting whoever is still connected."""
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


async def database_exists(admin_url: str, name: str) -> bool:
    conn = await asyncpg.connect(asyncpg_dsn(admin_url))
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()
