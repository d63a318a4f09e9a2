"""`esper kernels [--blueprint HASH] [--json] [--stats]`: what the registry holds;
`esper kernels retire KEY`: take a kernel out of service (trainers stop germinating it)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from sqlalchemy import text

from esper.errors import EsperError

LIST_SQL = """
SELECT k.id, k.cache_key, k.blueprint_hash, b.name, k.target, k.dtype, k.backend, k.status,
       k.artifact_digest, k.timings, k.created_at, k.updated_at
FROM kernels k JOIN blueprints b ON b.hash = k.blueprint_hash
{where}
ORDER BY k.created_at, k.cache_key
"""

# The compile stage records how each lookup was answered in its event's detail.
STATS_SQL = """
SELECT coalesce(detail->>'cache', 'unknown') AS answered_by, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY (detail->>'lookup_us')::float) AS p50_us,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY (detail->>'lookup_us')::float) AS p99_us
FROM kernel_events WHERE event = 'compiled'
GROUP BY 1 ORDER BY 1
"""


async def _query(args: argparse.Namespace) -> list[dict[str, Any]]:
    from esper.db.engine import create_engine
    from esper.infra.endpoints import resolve_database_url
    from esper.settings import get_settings

    engine = create_engine(resolve_database_url(get_settings()), pool_size=1)
    try:
        async with engine.connect() as conn:
            if args.stats:
                result = await conn.execute(text(STATS_SQL))
            elif args.blueprint:
                where = "WHERE k.blueprint_hash LIKE :prefix"
                result = await conn.execute(
                    text(LIST_SQL.format(where=where)), {"prefix": f"{args.blueprint}%"}
                )
            else:
                result = await conn.execute(text(LIST_SQL.format(where="")))
            return [dict(r._mapping) for r in result]
    finally:
        await engine.dispose()


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'blueprint':<24}{'hash':<14}{'target':<12}{'dtype':<10}{'backend':<12}"
          f"{'status':<11}{'compile ms':>11}")
    for r in rows:
        ms = (r["timings"] or {}).get("compile_ms")
        print(f"{r['name'][:23]:<24}{r['blueprint_hash'][:12]:<14}{r['target']:<12}"
              f"{r['dtype']:<10}{r['backend']:<12}{r['status']:<11}"
              f"{'-' if ms is None else f'{ms:.1f}':>11}")


def _print_stats(rows: list[dict[str, Any]]) -> None:
    total = sum(r["n"] for r in rows)
    hits = sum(r["n"] for r in rows if r["answered_by"] not in ("miss", "unknown"))
    print(f"{'answered by':<14}{'lookups':>9}{'p50 µs':>11}{'p99 µs':>11}")
    for r in rows:
        p50 = "-" if r["p50_us"] is None else f"{r['p50_us']:.1f}"
        p99 = "-" if r["p99_us"] is None else f"{r['p99_us']:.1f}"
        print(f"{r['answered_by']:<14}{r['n']:>9}{p50:>11}{p99:>11}")
    if total:
        print(f"hit ratio: {hits / total:.2%} of {total} compile requests")


def cmd_kernels(args: argparse.Namespace) -> int:
    try:
        rows = asyncio.run(_query(args))
    except EsperError as exc:
        print(f"esper kernels: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
    elif args.stats:
        _print_stats(rows)
    else:
        _print_table(rows)
    return 0


async def _retire(key: str, reason: str) -> Any:
    from esper.bus.connect import connect
    from esper.db.engine import create_engine, session_factory
    from esper.infra.endpoints import resolve_endpoints
    from esper.settings import get_settings
    from esper.stages.announce import publish_committed
    from esper.stages.deploy import retire_kernel

    endpoints = resolve_endpoints(get_settings())
    engine = create_engine(endpoints.database_url, pool_size=1)
    try:
        sessions = session_factory(engine)
        async with sessions() as session, session.begin():
            retired = await retire_kernel(session, key, reason)
        if retired.event is not None:
            # Committed with its outbox row: a failed publish is left to a relay.
            nc = await connect(endpoints.nats_servers, name="esper-retire", connect_timeout=10.0)
            try:
                await publish_committed(nc.jetstream(), sessions, [retired.event])
            finally:
                await nc.drain()
        return retired
    finally:
        await engine.dispose()


def cmd_retire(args: argparse.Namespace) -> int:
    try:
        retired = asyncio.run(_retire(args.key, args.reason))
    except EsperError as exc:
        print(f"esper kernels retire: {exc}", file=sys.stderr)
        return 1
    if retired.event is None:
        print(f"kernel {retired.cache_key[:16]} ({retired.name}) was retired already")
    else:
        print(f"retired kernel {retired.cache_key[:16]} ({retired.name}, was "
              f"{retired.previous_status}); trainers stop germinating it")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("kernels", help="list kernels and their status")
    p.add_argument("--blueprint", metavar="HASH", help="only this blueprint (a hash prefix)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--stats", action="store_true", help="cache hits/misses per tier")
    p.set_defaults(func=cmd_kernels)
    actions = p.add_subparsers(dest="kernels_action", metavar="ACTION")
    r = actions.add_parser("retire", help="retire a kernel: announced, never germinated again")
    r.add_argument("key", help="cache key (or a unique prefix of 6+ characters) or kernel id")
    r.add_argument("--reason", default="retired by operator", help="recorded with the event")
    r.set_defaults(func=cmd_retire)
