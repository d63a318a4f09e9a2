"""What the compile stage reads and writes in Postgres and puts on the wire:
kernel rows, blueprint rows, kernel events, KernelCompiled/KernelRejected."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.bus import events as ev
from esper.db.models import Blueprint, Kernel, KernelEvent

# A kernel in one of these states has an artifact: a cache hit.
HIT_STATUSES = ("compiled", "validated", "ready")
FAILED = "failed"


@dataclass(frozen=True)
class KernelRow:
    id: uuid.UUID
    status: str
    artifact_digest: str | None
    error: str | None


async def kernel_row(session: AsyncSession, key: str) -> KernelRow | None:
    """The kernel row for ``key`` as last committed (or written by this session)."""
    found = (await session.execute(
        select(Kernel.id, Kernel.status, Kernel.artifact_digest, Kernel.error)
        .where(Kernel.cache_key == key)
    )).first()
    return None if found is None else KernelRow(*found)


async def ensure_blueprint(sessions: async_sessionmaker[AsyncSession],
                           event: ev.BlueprintSubmitted) -> None:
    """Commit the blueprint's row now (submit_count 0), in its own transaction: a
    claim's kernel row references it. ``count_submission`` counts the message."""
    async with sessions() as session, session.begin():
        await session.execute(
            insert(Blueprint).values(hash=event.blueprint_hash, name=event.name, ir=event.ir,
                                     submit_count=0)
            .on_conflict_do_nothing(index_elements=[Blueprint.hash])
        )


async def count_submission(session: AsyncSession, event: ev.BlueprintSubmitted) -> None:
    """Upsert the blueprint row: first/last submitted, submit_count + 1."""
    stmt = insert(Blueprint).values(hash=event.blueprint_hash, name=event.name, ir=event.ir,
                                    submit_count=1)
    await session.execute(stmt.on_conflict_do_update(
        index_elements=[Blueprint.hash],
        set_={"last_submitted_at": func.now(), "submit_count": Blueprint.submit_count + 1},
    ))


async def record(session: AsyncSession, *, kernel_id: uuid.UUID, what: str, status: str,
                 event: ev.BlueprintSubmitted, detail: dict[str, Any]) -> None:
    """One kernel_events row. 'compiled' rows always hold ``cache`` (a tier or
    "miss") and ``lookup_us``: `esper kernels --stats` aggregates them."""
    await session.execute(insert(KernelEvent).values(
        kernel_id=kernel_id, event=what, status=status, correlation_id=event.correlation_id,
        detail={"event_id": str(event.event_id), **detail},
    ))


def compiled_event(event: ev.BlueprintSubmitted, *, kernel_id: uuid.UUID, key: str,
                   target: str, dtype: str, backend: str, digest: str | None, cache_hit: bool,
                   compile_ms: float | None = None) -> ev.KernelCompiled:
    return ev.KernelCompiled(
        correlation_id=event.correlation_id, kernel_id=kernel_id, cache_key=key,
        blueprint_hash=event.blueprint_hash, target=target, dtype=dtype,  # type: ignore[arg-type]
        backend=backend, artifact_digest=digest, cache_hit=cache_hit, compile_ms=compile_ms,
    )


def rejected_event(event: ev.BlueprintSubmitted, *, stage: str, kernel_id: uuid.UUID | None,
                   key: str | None, target: str, check: str, message: str
                   ) -> ev.KernelRejected:
    return ev.KernelRejected(
        correlation_id=event.correlation_id, kernel_id=kernel_id, cache_key=key,
        blueprint_hash=event.blueprint_hash, target=target, stage=stage,
        reasons=[ev.RejectReason(check=check, message=message[:4000])],
    )
