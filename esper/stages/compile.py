"""The compile stage: ``BlueprintSubmitted`` → one ``KernelCompiled`` per (target,
dtype), or ``KernelRejected``.

Keys come from the *optimised* IR's canonical hash: the passes preserve
semantics and are a fixed point, so blueprints that differ only in ids, node
order, symbol names — or in dead nodes, duplicate pure subexpressions, foldable
scale/identity chains — share one key and one compile. (Kernel rows and events
carry the *submitted* blueprint's hash; the artifact manifest the optimised one.)

Per key: a kernel row with an artifact (compiled/validated/ready) is a hit,
answered by the registry's tiers (memory → disk → durable), no compile. Else a
claim in Postgres (its own transaction, visible at once) lets exactly one worker
compile, in a child process (``compile_subprocess``) with heartbeats; the others
wait, then hit. A crash, timeout or compile error is a recorded rejection
(kernel ``failed``, a ``rejected`` kernel event, ``KernelRejected``) and the
message is acked; later submissions of that key are rejected from the row.
Everything but the claim commits in ``ctx.session`` with the inbox/outbox.

No two handlers wait on each other: each takes its keys' claims in sorted key
order and writes its blueprint row (the one row lock they share) last."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.artifacts.format import Artifact as ArtifactFile
from esper.artifacts.signing import load_public_key
from esper.bus import events as ev
from esper.bus.connect import connect
from esper.cache import (
    DiskTier,
    DurableTier,
    KernelRegistry,
    MemoryTier,
    claim_compile,
    current_versions,
    finish_claim,
    renew_claim,
    wait_for_kernel,
)
from esper.cache.claims import CLAIMED
from esper.compile.backend import CompileOptions
from esper.compile.passes import optimize
from esper.compile.pipeline import compute_cache_key
from esper.errors import ArtifactError, CompileError, ConfigError, IRValidationError, Reject, Retry
from esper.ir import BlueprintIR
from esper.settings import Settings
from esper.stages import compile_records as rec
from esper.stages.compile_config import CompileStageConfig
from esper.stages.compile_subprocess import CompileRequest, WarmChildren, run_compile
from esper.stages.targets import BackendChoice, choose_backend
from esper.workers.txn import engine_of

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from esper.workers.runtime import HandlerContext

log = logging.getLogger(__name__)

__all__ = ["CompileHandler", "CompileStageConfig", "make_compile_handler", "parse_submission"]


@dataclass(frozen=True)
class _Plan:
    """One (target, dtype) of a submission, keyed."""

    key: str
    target: str
    dtype: str
    choice: BackendChoice
    versions: dict[str, str]
    options: CompileOptions


@dataclass(frozen=True)
class _Job:
    """One message being handled."""

    event: ev.BlueprintSubmitted
    ctx: HandlerContext[Any]
    optimised: BlueprintIR
    sessions: async_sessionmaker[AsyncSession]


@dataclass(frozen=True)
class _Built:
    """A finished compile: the stored artifact's digest, or the error."""

    digest: str | None
    compile_ms: float | None
    timings: dict[str, float]
    error: str | None = None


def _manifest_of(artifact: ArtifactFile) -> Any:
    # The compile stage never runs kernels: a verified manifest is all it keeps.
    return artifact.manifest


def parse_submission(event: ev.BlueprintSubmitted) -> BlueprintIR:
    """The submitted blueprint; Reject if invalid or not the hash it claims."""
    try:
        ir = BlueprintIR.from_dict(event.ir)
    except IRValidationError as exc:
        raise Reject(f"invalid blueprint: {exc}") from exc
    if ir.canonical_hash() != event.blueprint_hash:
        raise Reject(
            f"blueprint hash mismatch: submitted {event.blueprint_hash}, is {ir.canonical_hash()}"
        )
    return ir


class CompileHandler:
    """The compile stage's handler; one per worker process (``close`` when done)."""

    def __init__(self, config: CompileStageConfig) -> None:
        self.config = config
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.choices = {t: choose_backend(t) for t in config.targets}
        for choice in self.choices.values():
            if choice.fallback:
                log.warning("target %s compiles with %s: %s",
                            choice.target, choice.backend, choice.fallback)
        self.public_key = load_public_key(config.signing_key)
        self._toolchain = {b.backend: current_versions(b.backend) for b in self.choices.values()}
        self._lease = timedelta(seconds=config.lease_s)
        self._registry: KernelRegistry | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._nc: NATS | None = None
        self._init_lock = asyncio.Lock()
        self._inflight: set[str] = set()
        self._spares: WarmChildren | None = None

    @property
    def registry(self) -> KernelRegistry:
        if self._registry is None:
            raise RuntimeError("the compile handler has not handled an event yet")
        return self._registry

    async def _ready(self, session: AsyncSession) -> async_sessionmaker[AsyncSession]:
        """Claims use the worker's own engine; the durable tier its own NATS link."""
        async with self._init_lock:
            if self._spares is None:
                # Starts a compiler child now, while this event's lookups run.
                self._spares = WarmChildren(size=1)
                self._spares.prime()
            if self._sessions is None:
                engine = engine_of(session)
                if engine is None:
                    raise ConfigError("the compile handler needs a session bound to an engine")
                sessions = async_sessionmaker(engine, expire_on_commit=False)
                tag = self.worker_id.rsplit(":", 1)[-1]
                self._nc = await connect(self.config.nats_url, name=f"esper-compile-{tag}")
                durable = DurableTier(sessions, self._nc, bucket=self.config.durable_bucket)
                self._registry = KernelRegistry(
                    MemoryTier(self.config.memory_capacity), DiskTier(self.config.cache_dir),
                    durable, self.public_key, _manifest_of,
                )
                self._sessions = sessions
            return self._sessions

    async def close(self) -> None:
        """Finish pending disk fills, stop spare compilers, drain the NATS connection."""
        if self._spares is not None:
            await self._spares.close()
        if self._registry is not None:
            await self._registry.flush()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 5.0)

    # -- one message -----------------------------------------------------------------
    async def __call__(self, event: ev.BlueprintSubmitted, ctx: HandlerContext[Any]) -> None:
        ir = parse_submission(event)
        job = _Job(event, ctx, optimize(ir), await self._ready(ctx.session))
        plans: list[_Plan] = []
        for target in self.config.targets:
            choice = self.choices[target]
            for dtype in dict.fromkeys(event.dtypes):
                options = CompileOptions(dtype=dtype, extra=dict(self.config.options_extra))
                versions = {**self._toolchain[choice.backend], **self.config.versions}
                try:
                    key = compute_cache_key(job.optimised, target=target, dtype=dtype,
                                            backend=choice.backend, options=options,
                                            versions=versions)
                except CompileError as exc:  # e.g. an int64 "dtype": nothing compiles it
                    ctx.emit(rec.rejected_event(event, stage=ctx.stage, kernel_id=None,
                                                key=None, target=target, check="compile",
                                                message=str(exc)))
                    continue
                plans.append(_Plan(key, target, dtype, choice, versions, options))
        # One global claim order: a handler only waits on keys above all it holds.
        for plan in sorted(plans, key=lambda p: p.key):
            await self._one(job, plan)
        await rec.count_submission(ctx.session, event)

    async def _one(self, job: _Job, plan: _Plan) -> None:
        t0 = time.perf_counter()
        row = await rec.kernel_row(job.ctx.session, plan.key)
        if row is not None and row.status != CLAIMED:
            await self._answer_from_row(job, plan, row)
            return
        lookup_us = (time.perf_counter() - t0) * 1e6
        await rec.ensure_blueprint(job.sessions, job.event)
        deadline = time.monotonic() + self.config.compile_timeout + 2 * self.config.lease_s
        waited_from: float | None = None
        while True:
            claim = await claim_compile(
                job.sessions, cache_key=plan.key, blueprint_hash=job.event.blueprint_hash,
                target=plan.target, dtype=plan.dtype, backend=plan.choice.backend,
                versions=plan.versions, worker_id=self.worker_id, lease=self._lease,
            )
            # Our own claim with no compile of it running here: an earlier attempt
            # of ours died before its transaction committed.
            stale_own = (claim.status == CLAIMED and claim.claimed_by == self.worker_id
                         and plan.key not in self._inflight)
            if claim.won or stale_own:
                await self._compile(job, plan, claim.kernel_id, lookup_us,
                                    recovering=stale_own or claim.taken_over)
                return
            if claim.status != CLAIMED:
                row = await rec.kernel_row(job.ctx.session, plan.key)
                assert row is not None
                waited = None if waited_from is None else time.monotonic() - waited_from
                await self._answer_from_row(job, plan, row, waited_s=waited)
                return
            waited_from = waited_from or time.monotonic()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Retry(f"kernel {plan.key[:12]} is still being compiled by "
                            f"{claim.claimed_by}")
            with contextlib.suppress(TimeoutError):
                async with self._heartbeats(job.ctx):
                    # A lease at most, then claim again: that takes a stale claim over.
                    await wait_for_kernel(job.sessions, plan.key,
                                          timeout=min(remaining, self.config.lease_s))

    async def _answer_from_row(self, job: _Job, plan: _Plan, row: rec.KernelRow,
                               waited_s: float | None = None) -> None:
        """A settled kernel: a hit served by a cache tier, or a known failure."""
        if row.status not in rec.HIT_STATUSES:
            check = "compile" if row.status == rec.FAILED else "cache"
            message = row.error if row.status == rec.FAILED and row.error else (
                f"kernel {row.id} is {row.status}" + (f": {row.error}" if row.error else ""))
            await self._rejected(job, plan, row.id, status=row.status, check=check,
                                 message=message, detail={"cache": row.status})
            return
        t0 = time.perf_counter()
        loaded = self.registry.lookup_memory(plan.key)
        tier = "memory"
        if loaded is None:
            loaded = await self.registry.lookup(plan.key)
            tier = loaded.tier if loaded is not None else "none"
        lookup_us = (time.perf_counter() - t0) * 1e6
        if loaded is None:
            raise Retry(f"kernel {row.id} is {row.status} but no cache tier holds its artifact "
                        f"{row.artifact_digest}")
        detail: dict[str, Any] = {"cache": tier, "lookup_us": lookup_us, "cache_hit": True}
        if waited_s is not None:
            detail["waited_ms"] = waited_s * 1000
        await self._record(job, plan, row.id, "compiled", status=row.status, detail=detail)
        job.ctx.emit(self._compiled(job, plan, row.id, loaded.digest, cache_hit=True))

    async def _compile(self, job: _Job, plan: _Plan, kernel_id: uuid.UUID, lookup_us: float,
                       *, recovering: bool) -> None:
        detail: dict[str, Any] = {"cache": "miss", "lookup_us": lookup_us, "cache_hit": False}
        self._inflight.add(plan.key)
        try:
            found = await self._recover(plan.key) if recovering else None
            if found is not None:  # built by the attempt that died: no second compile
                built = _Built(found[0], None, {})
                detail["recovered_from"] = found[1]
            else:
                built = await self._build(job, plan)
                detail["compile_ms"] = built.compile_ms
            await self._settle(job, plan, kernel_id, built, detail)
        finally:
            self._inflight.discard(plan.key)

    async def _recover(self, key: str) -> tuple[str, str] | None:
        """(digest, tier) of an artifact an earlier, killed attempt built for ``key``,
        stored again into every tier (the kill may have come between two)."""
        registry = self.registry
        packed, tier = await asyncio.to_thread(registry.disk.get_by_key, key), "disk"
        if packed is None and registry.durable is not None:
            packed, tier = await registry.durable.get_by_key(key), "durable"
        if packed is None:
            return None
        try:
            return await registry.store(key, packed), tier
        except ArtifactError as exc:
            log.warning("ignoring the stored artifact for %s: %s", key[:12], exc)
            return None

    async def _build(self, job: _Job, plan: _Plan) -> _Built:
        """Compile in a child process and store the artifact in every tier."""
        with tempfile.TemporaryDirectory(prefix="esper-compile-") as tmp:
            request = CompileRequest(
                ir=job.optimised.to_dict(), target=plan.target, dtype=plan.dtype,
                backend=plan.choice.backend, options=plan.options.model_dump(),
                versions=plan.versions, signing_key=str(self.config.signing_key),
                output=str(Path(tmp) / "artifact"),
            )
            async with self._heartbeats(job.ctx, renew=plan.key):
                outcome = await run_compile(request, timeout=self.config.compile_timeout,
                                            tick=self.config.heartbeat_s, spares=self._spares)
        ms = outcome.wall_s * 1000
        if not outcome.ok:
            return _Built(None, ms, {}, outcome.error)
        assert outcome.reply is not None and outcome.packed is not None
        if outcome.reply.cache_key != plan.key:
            return _Built(None, ms, {}, f"compiler built key {outcome.reply.cache_key}, "
                          f"expected {plan.key} (worker and compiler disagree on the toolchain?)")
        try:
            digest = await self.registry.store(plan.key, outcome.packed)
        except ArtifactError as exc:
            return _Built(None, ms, {}, f"compiled artifact refused: {exc}")
        child = {f"{k.removesuffix('_s')}_ms": v * 1000 for k, v in outcome.reply.timings.items()}
        return _Built(digest, ms, {"compile_ms": ms, **child})

    async def _settle(self, job: _Job, plan: _Plan, kernel_id: uuid.UUID, built: _Built,
                      detail: dict[str, Any]) -> None:
        """Move our claim to compiled/failed in ctx.session, record it, emit."""
        status = rec.FAILED if built.error is not None else "compiled"
        held = await finish_claim(job.ctx.session, cache_key=plan.key, worker_id=self.worker_id,
                                  status=status, artifact_digest=built.digest, error=built.error,
                                  timings=built.timings or None)
        if not held:  # taken over, or settled by a sibling handler: answer from the row
            row = await rec.kernel_row(job.ctx.session, plan.key)
            if row is None or row.status == CLAIMED:
                raise Retry(f"lost the compile claim on {plan.key[:12]}")
            await self._answer_from_row(job, plan, row)
            return
        if built.error is not None:
            log.warning("compile of %s for %s/%s failed: %s", job.event.blueprint_hash[:12],
                        plan.target, plan.dtype, built.error)
            await self._rejected(job, plan, kernel_id, status=status, check="compile",
                                 message=built.error, detail=detail)
            return
        await self._record(job, plan, kernel_id, "compiled", status=status, detail=detail)
        job.ctx.emit(self._compiled(job, plan, kernel_id, built.digest, cache_hit=False,
                                    compile_ms=built.compile_ms))

    # -- helpers ---------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _heartbeats(self, ctx: HandlerContext[Any], renew: str | None = None
                          ) -> AsyncIterator[None]:
        """Keep the message (and our claim on key ``renew``) alive while we work."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.config.heartbeat_s)
                await ctx.heartbeat()
                if renew is None or self._sessions is None:
                    continue
                try:
                    if not await renew_claim(self._sessions, cache_key=renew,
                                             worker_id=self.worker_id):
                        log.warning("the compile claim on %s was taken over", renew[:12])
                except Exception as exc:  # the database may be away for a moment
                    log.warning("could not renew the claim on %s: %s", renew[:12], exc)

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _record(self, job: _Job, plan: _Plan, kernel_id: uuid.UUID, what: str, *,
                      status: str, detail: dict[str, Any]) -> None:
        extra: dict[str, Any] = {"stage": job.ctx.stage, "backend": plan.choice.backend}
        if plan.choice.fallback:
            extra["backend_fallback"] = plan.choice.fallback
        await rec.record(job.ctx.session, kernel_id=kernel_id, what=what, status=status,
                         event=job.event, detail={**extra, **detail})

    async def _rejected(self, job: _Job, plan: _Plan, kernel_id: uuid.UUID, *, status: str,
                        check: str, message: str, detail: dict[str, Any]) -> None:
        reasons = [{"check": check, "message": message}]
        await self._record(job, plan, kernel_id, "rejected", status=status,
                           detail={"reasons": reasons, **detail})
        job.ctx.emit(rec.rejected_event(job.event, stage=job.ctx.stage, kernel_id=kernel_id,
                                        key=plan.key, target=plan.target, check=check,
                                        message=message))

    @staticmethod
    def _compiled(job: _Job, plan: _Plan, kernel_id: uuid.UUID, digest: str | None, *,
                  cache_hit: bool, compile_ms: float | None = None) -> ev.KernelCompiled:
        return rec.compiled_event(job.event, kernel_id=kernel_id, key=plan.key,
                                  target=plan.target, dtype=plan.dtype,
                                  backend=plan.choice.backend, digest=digest,
                                  cache_hit=cache_hit, compile_ms=compile_ms)


def make_compile_handler(settings: Settings, **overrides: Any) -> CompileHandler:
    """The stage registry's factory: ``CompileHandler(CompileStageConfig.from_settings)``."""
    return CompileHandler(CompileStageConfig.from_settings(settings, **overrides))
