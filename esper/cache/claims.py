"""Compile once: a claim on a cache key is a row in ``kernels`` (cache_key UNIQUE).
The first INSERT wins; everyone else reads the row and waits for it to leave
``claimed``. A claim whose holder stopped renewing it for a lease is taken over."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.db.models import Kernel

log = logging.getLogger(__name__)

CLAIMED = "claimed"
DEFAULT_LEASE = timedelta(minutes=10)


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of a claim, or the state a waiter saw."""

    won: bool
    kernel_id: uuid.UUID
    status: str
    claimed_by: str | None
    artifact_digest: str | None = None
    error: str | None = None
    taken_over: bool = False  # won by taking over a stale claim


def _claim_from_row(row: Any, *, won: bool = False) -> Claim:
    return Claim(
        won=won,
        kernel_id=row.id,
        status=row.status,
        claimed_by=row.claimed_by,
        artifact_digest=row.artifact_digest,
        error=row.error,
    )


_STATE = (Kernel.id, Kernel.status, Kernel.claimed_by, Kernel.artifact_digest, Kernel.error)


async def claim_compile(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    cache_key: str,
    blueprint_hash: str,
    target: str,
    dtype: str,
    backend: str,
    versions: Mapping[str, str],
    worker_id: str,
    lease: timedelta = DEFAULT_LEASE,
) -> Claim:
    """Claim the right to compile ``cache_key``. Exactly one concurrent caller gets
    ``won=True``; the rest get the existing row's state. The blueprint's row must
    already exist (``kernels.blueprint_hash`` references it)."""
    async with session_factory() as session, session.begin():
        try:
            kernel_id = await session.scalar(
                pg_insert(Kernel)
                .values(
                    id=uuid.uuid4(),
                    blueprint_hash=blueprint_hash,
                    cache_key=cache_key,
                    target=target,
                    dtype=dtype,
                    backend=backend,
                    status=CLAIMED,
                    versions=dict(versions),
                    claimed_by=worker_id,
                    claimed_at=func.clock_timestamp(),
                )
                .on_conflict_do_nothing(index_elements=[Kernel.cache_key])
                .returning(Kernel.id)
            )
        except IntegrityError as exc:
            raise LookupError(
                f"cannot claim {cache_key}: blueprint {blueprint_hash} has no row in blueprints"
            ) from exc
        if kernel_id is not None:
            return Claim(won=True, kernel_id=kernel_id, status=CLAIMED, claimed_by=worker_id)

        # Row locks make racing takeovers serialise; the loser re-evaluates the
        # WHERE against the winner's fresh claimed_at and matches nothing.
        taken = (
            await session.execute(
                update(Kernel)
                .where(
                    Kernel.cache_key == cache_key,
                    Kernel.status == CLAIMED,
                    Kernel.claimed_at < func.clock_timestamp() - lease,
                )
                .values(
                    claimed_by=worker_id,
                    claimed_at=func.clock_timestamp(),
                    updated_at=func.clock_timestamp(),
                )
                .returning(Kernel.id, Kernel.claimed_by)
            )
        ).first()
        if taken is not None:
            log.warning("took over stale compile claim on %s (worker %s)", cache_key, worker_id)
            return Claim(
                won=True,
                kernel_id=taken.id,
                status=CLAIMED,
                claimed_by=worker_id,
                taken_over=True,
            )
        row = (await session.execute(select(*_STATE).where(Kernel.cache_key == cache_key))).one()
        return _claim_from_row(row)


async def renew_claim(
    session_factory: async_sessionmaker[AsyncSession], *, cache_key: str, worker_id: str
) -> bool:
    """Push the lease forward during a long compile; False if the claim was lost."""
    async with session_factory() as session, session.begin():
        result = await session.execute(
            update(Kernel)
            .where(
                Kernel.cache_key == cache_key,
                Kernel.claimed_by == worker_id,
                Kernel.status == CLAIMED,
            )
            .values(claimed_at=func.clock_timestamp())
            .returning(Kernel.id)
        )
        return result.first() is not None


async def finish_claim(
    session: AsyncSession,
    *,
    cache_key: str,
    worker_id: str,
    status: str,
    artifact_digest: str | None = None,
    error: str | None = None,
    timings: Mapping[str, float] | None = None,
) -> bool:
    """Move a claim this worker still holds to ``status`` (compiled, failed…), in
    the caller's transaction (so it commits with the outbox). False if the claim
    was taken over meanwhile: the caller must then not publish its result."""
    if status == CLAIMED:
        raise ValueError("finish_claim needs a status other than 'claimed'")
    values: dict[str, Any] = {
        "status": status,
        "artifact_digest": artifact_digest,
        "error": error,
        "updated_at": func.clock_timestamp(),
    }
    if timings is not None:
        values["timings"] = dict(timings)
    result = await session.execute(
        update(Kernel)
        .where(
            Kernel.cache_key == cache_key,
            Kernel.claimed_by == worker_id,
            Kernel.status == CLAIMED,
        )
        .values(**values)
        .returning(Kernel.id)
    )
    return result.first() is not None


async def kernel_state(
    session_factory: async_sessionmaker[AsyncSession], cache_key: str
) -> Claim | None:
    async with session_factory() as session:
        row = (await session.execute(select(*_STATE).where(Kernel.cache_key == cache_key))).first()
    return None if row is None else _claim_from_row(row)


async def wait_for_kernel(
    session_factory: async_sessionmaker[AsyncSession],
    cache_key: str,
    timeout: float,
    *,
    poll: float = 0.02,
    max_poll: float = 0.5,
) -> Claim:
    """Wait until the kernel's status leaves ``claimed``; return its state. Raises
    TimeoutError after ``timeout`` s and LookupError if no claim exists. After a
    timeout, call ``claim_compile`` again: it takes the claim over if it is stale."""
    deadline = time.monotonic() + timeout
    delay = poll
    while True:
        state = await kernel_state(session_factory, cache_key)
        if state is None:
            raise LookupError(f"no kernel row for cache key {cache_key}")
        if state.status != CLAIMED:
            return state
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"kernel {cache_key} still claimed by {state.claimed_by} after {timeout} s"
            )
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, max_poll)
