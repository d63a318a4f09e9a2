"""Init step for workers and trainers on Kubernetes: wait until the database is
migrated to the newest revision (the migration Job runs ``esper db upgrade``),
so that no worker consumes an event before its tables exist.

    python /opt/esper/deploy/wait_for_schema.py [--timeout SECONDS]"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from alembic.script import ScriptDirectory

from esper.db.migrate import alembic_config, current
from esper.errors import EsperError
from esper.infra.endpoints import resolve_database_url
from esper.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    try:
        url = resolve_database_url(get_settings())
    except EsperError as exc:
        print(f"wait_for_schema: {exc}", file=sys.stderr)
        return 2
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            at = asyncio.run(current(url))
        except Exception as exc:  # the database may not accept connections yet
            at = f"unreachable ({type(exc).__name__})"
        if at == head:
            print(f"database at {head}")
            return 0
        if time.monotonic() > deadline:
            print(f"wait_for_schema: database at {at}, not {head}", file=sys.stderr)
            return 1
        print(f"database at {at}, waiting for {head}", flush=True)
        time.sleep(3)


if __name__ == "__main__":
    raise SystemExit(main())
