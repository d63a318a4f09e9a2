"""``esper db``: migrate the database named by ESPER_DATABASE_URL or endpoints.json."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from alembic.util.exc import CommandError
from sqlalchemy.exc import SQLAlchemyError

from esper.db import migrate
from esper.errors import ConfigError
from esper.infra.endpoints import resolve_database_url
from esper.settings import get_settings


def _run(action: str, step: Callable[[str], Coroutine[Any, Any, None]] | None) -> int:
    """Run ``step(url)`` if given, then print the revision the database is at."""
    try:
        url = resolve_database_url(get_settings())
        if step is not None:
            asyncio.run(step(url))
        print(asyncio.run(migrate.current(url)) or "base")
    except (ConfigError, CommandError, SQLAlchemyError, OSError) as exc:
        print(f"esper db {action}: {exc}", file=sys.stderr)
        return 2
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    return _run("upgrade", lambda url: migrate.upgrade(url, args.revision))


def _downgrade(args: argparse.Namespace) -> int:
    return _run("downgrade", lambda url: migrate.downgrade(url, args.revision))


def _current(args: argparse.Namespace) -> int:
    return _run("current", None)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("db", help="database migrations (Alembic)")
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    up = sub.add_parser("upgrade", help="migrate up (default: to the newest revision)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=_upgrade)

    down = sub.add_parser("downgrade", help="migrate down to REVISION ('base': empty)")
    down.add_argument("revision")
    down.set_defaults(func=_downgrade)

    cur = sub.add_parser("current", help="print the revision the database is at")
    cur.set_defaults(func=_current)
