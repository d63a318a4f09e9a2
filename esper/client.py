"""A Python client for programs that publish blueprints and follow their journey.

    async with EsperClient.connect() as client:
        subs = await client.submit([ir_dict_or_path, ...])
        outcome = await client.wait([s.blueprint_hash for s in subs], timeout=60)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from nats.aio.client import Client as NATS
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.publish import Blueprintish, make_submission, submit_events
from esper.bus.topology import Topology, ensure_streams
from esper.db.engine import create_engine
from esper.infra.endpoints import Endpoints, resolve_endpoints
from esper.settings import Settings, get_settings

# Kernel statuses after which nothing more happens to a kernel in the pipeline.
TERMINAL = frozenset({"ready", "rejected", "failed", "retired"})

HISTORY_SQL = text(
    """
    SELECT event_seq, blueprint_hash, kernel_id, event, status, target, dtype, backend, detail
    FROM kernel_history
    WHERE blueprint_hash = ANY(:hashes) AND event_seq > :after
    ORDER BY event_seq
    """
)

DEAD_SQL = text(
    "SELECT event_id, reason FROM dead_letters WHERE stage = 'compile' AND event_id = ANY(:ids)"
)

KERNELS_SQL = text(
    "SELECT blueprint_hash, id, status FROM kernels WHERE blueprint_hash = ANY(:hashes)"
)


@dataclass(frozen=True)
class HistoryRow:
    blueprint_hash: str
    kernel_id: str
    event: str
    status: str
    target: str
    dtype: str
    backend: str
    detail: dict[str, Any]


@dataclass
class Outcome:
    """Where each blueprint's kernels ended: ``ready`` and ``rejected`` map a
    blueprint hash to its kernels' history rows; ``pending`` timed out."""

    ready: dict[str, list[HistoryRow]] = field(default_factory=dict)
    rejected: dict[str, list[HistoryRow]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.pending


class EsperClient:
    """Publishes over NATS; follows progress in PostgreSQL (the source of truth)."""

    def __init__(self, nc: NATS, engine: AsyncEngine, topology: Topology | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.engine = engine
        self.topology = topology or Topology()

    @classmethod
    async def connect(
        cls, endpoints: Endpoints | None = None, *, settings: Settings | None = None
    ) -> Self:
        endpoints = endpoints or resolve_endpoints(settings or get_settings())
        nc = await connect(endpoints.nats_servers, name="esper-client", connect_timeout=10.0)
        client = cls(nc, create_engine(endpoints.database_url, pool_size=2))
        await ensure_streams(client.js, client.topology, update=False)
        return client

    async def close(self) -> None:
        await self.nc.drain()
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def submit(
        self, blueprints: Iterable[Blueprintish], *, dtypes: tuple[str, ...] = ("float32",)
    ) -> list[ev.BlueprintSubmitted]:
        """Validate every blueprint locally (IRValidationError names the first bad
        one, and nothing is published), then publish them all."""
        submissions = [make_submission(b, dtypes=dtypes) for b in blueprints]
        await submit_events(self.js, submissions, nc=self.nc)  # atomic batches, as `submit`
        return submissions

    async def history(self, hashes: Sequence[str], after: int = 0) -> list[tuple[int, HistoryRow]]:
        """Kernel lifecycle rows of these blueprints after event id ``after``."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(HISTORY_SQL, {"hashes": list(hashes), "after": after})).all()
        return [
            (
                r.event_seq,
                HistoryRow(
                    r.blueprint_hash, str(r.kernel_id), r.event, r.status, r.target, r.dtype,
                    r.backend, dict(r.detail or {}),
                ),
            )
            for r in rows
        ]

    async def _dead_lettered(self, by_event: dict[str, str]) -> list[tuple[str, str]]:
        if not by_event:
            return []
        async with self.engine.connect() as conn:
            rows = (await conn.execute(DEAD_SQL, {"ids": list(by_event)})).all()
        return [(by_event[r.event_id], r.reason) for r in rows]

    async def wait(
        self,
        hashes: Sequence[str],
        *,
        timeout: float = 300.0,
        poll: float = 0.1,
        on_event: Callable[[HistoryRow], None] | None = None,
        submissions: Sequence[ev.BlueprintSubmitted] = (),
    ) -> Outcome:
        """Until every blueprint has kernels and all are terminal (or timeout).
        A blueprint is rejected if any of its kernels was rejected or failed, or
        if the compile stage dead-lettered its submission (one of ``submissions``)."""
        deadline = time.monotonic() + timeout
        by_event = {str(s.event_id): s.blueprint_hash for s in submissions}
        after = 0
        seen: dict[str, list[HistoryRow]] = {h: [] for h in hashes}
        while True:
            # Status first, then history: a kernel's status and its lifecycle row are
            # committed together, so every event that led to a status read here is
            # in the history read after it (read the other way round, a kernel could
            # turn ready between the two reads and its "ready" row never be shown).
            async with self.engine.connect() as conn:
                kernels = (await conn.execute(KERNELS_SQL, {"hashes": list(hashes)})).all()
            for event_id, row in await self.history(hashes, after):
                after = max(after, event_id)
                seen[row.blueprint_hash].append(row)
                if on_event is not None:
                    on_event(row)
            status: dict[str, list[str]] = {h: [] for h in hashes}
            for k in kernels:
                status[k.blueprint_hash].append(k.status)
            done = {h for h, s in status.items() if s and all(x in TERMINAL for x in s)}
            for h, reason in await self._dead_lettered(by_event):
                if h not in done:
                    done.add(h)
                    status[h].append("rejected")
                    seen[h].append(HistoryRow(h, "", "rejected", "rejected", "-", "-", "-",
                                              {"reasons": [{"check": "dead_letter",
                                                            "message": reason}]}))
            if len(done) == len(hashes) or time.monotonic() >= deadline:
                outcome = Outcome()
                for h in hashes:
                    if h not in done:
                        outcome.pending.append(h)
                    elif any(x in ("rejected", "failed") for x in status[h]):
                        outcome.rejected[h] = seen[h]
                    else:
                        outcome.ready[h] = seen[h]
                return outcome
            await asyncio.sleep(poll)
