"""The async engine and session factory every process uses to reach Postgres."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from esper.errors import ConfigError

_ASYNC_DRIVER = "postgresql+asyncpg"


def async_url(url: str) -> str:
    """``url`` with the asyncpg driver (``postgres://`` and ``postgresql://``
    are accepted as written by other tools)."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"invalid database URL {url!r}: {exc}") from exc
    if parsed.drivername in ("postgres", "postgresql", "postgresql+asyncpg"):
        return parsed.set(drivername=_ASYNC_DRIVER).render_as_string(hide_password=False)
    raise ConfigError(f"database URL must be postgresql+asyncpg://..., got {parsed.drivername!r}")


def create_engine(url: str, **kw: Any) -> AsyncEngine:
    """An asyncpg engine. ``pool_pre_ping`` replaces connections that a Postgres
    restart has broken instead of handing them out."""
    kw.setdefault("pool_pre_ping", True)
    return create_async_engine(async_url(url), **kw)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (no lazy reloads in async code)."""
    return async_sessionmaker(engine, expire_on_commit=False)
