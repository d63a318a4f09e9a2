"""The validate stage: prove each compiled kernel before any trainer sees it.

Consumes ``esper.kernel.compiled``. The kernel row is locked (two submissions of
one blueprint validate it once); a kernel already decided (a cache hit of an
earlier submission) is not validated again: its stored verdict is re-emitted.
Otherwise the artifact's bytes are fetched by digest (local disk tier, then the
durable store), checked in a sandbox subprocess (``esper.validate.runner``), and
the verdict is recorded — a ``validations`` row, a ``kernel_events`` row
(``validated``/``rejected``), ``kernels.status`` — and emitted as
``KernelValidated`` or ``KernelRejected`` with machine-readable reasons.

Pass-through kernels (``ESPER_PASSTHROUGH`` compile stage) carry no artifact;
they keep the pass-through validation. A sandbox that cannot start, or a
validator that cannot run the kernel (wrong GPU, ``cuda_on_cpu="defer"``), is
a Retry, never a verdict on the kernel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from esper.artifacts.signing import ensure_keypair, load_public_key, public_pem
from esper.bus import events as ev
from esper.bus.connect import connect
from esper.cache.disk import DiskTier
from esper.cache.durable import BUCKET, DurableTier
from esper.db.models import Artifact, Blueprint, Kernel, KernelEvent, Validation
from esper.errors import ConfigError, Reject, Retry
from esper.settings import Settings
from esper.validate import report as r
from esper.validate.policy import ValidationPolicy
from esper.validate.protocol import ExpectedKernel
from esper.validate.runner import SandboxError, SandboxRunner
from esper.workers import passthrough
from esper.workers.txn import engine_of

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from esper.workers.runtime import HandlerContext

log = logging.getLogger(__name__)

STAGE = "validate"
# Statuses whose verdict is final for this stage: re-emitted, never re-validated.
DECIDED = ("validated", "ready", "rejected")


@dataclass(frozen=True)
class ValidateStageConfig:
    """Everything the validate handler needs. The key and the NATS endpoints are
    resolved at the first kernel that needs them, so a worker that only sees
    pass-through kernels touches neither."""

    home: Path
    public_key: Path | None = None
    """None: ESPER_HOME's default key pair (made on first use, as the compile stage does)."""
    nats_url: str | list[str] | None = None
    """None: from ``settings``' endpoints (env or endpoints.json) on first use."""
    settings: Settings | None = None
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    durable_bucket: str = BUCKET
    spares: int = 1
    sandbox_env: Mapping[str, str] | None = None
    sandbox_cwd: Path | None = None

    @property
    def cache_dir(self) -> Path:
        """The local disk tier the compile stage fills (``ESPER_HOME/artifacts``)."""
        return self.home / "artifacts"

    def resolve_public_key(self) -> Path:
        return self.public_key or ensure_keypair(self.home)

    def resolve_nats_url(self) -> str | list[str]:
        if self.nats_url is not None:
            return self.nats_url
        from esper.infra.endpoints import resolve_endpoints

        return resolve_endpoints(self.settings or Settings(home=self.home)).nats_url

    @classmethod
    def from_settings(cls, settings: Settings, *, environ: Mapping[str, str] | None = None,
                      **overrides: Any) -> ValidateStageConfig:
        """Public key from ESPER_PUBLIC_KEY (else ESPER_SIGNING_KEY's public half, else
        the default pair under ESPER_HOME); NATS from ESPER_NATS_URL or the endpoints;
        extra backend modules from ESPER_EXTRA_BACKENDS. Keyword overrides win."""
        overrides.setdefault("public_key", settings.public_key or settings.signing_key)
        overrides.setdefault("nats_url", settings.nats_url)
        if "policy" not in overrides:
            env = os.environ if environ is None else environ
            overrides["policy"] = ValidationPolicy.with_extra_backends(env)
        overrides.setdefault("home", settings.home)
        overrides.setdefault("settings", settings)
        return cls(**overrides)


@dataclass(frozen=True)
class _KernelRow:
    id: uuid.UUID
    status: str
    cache_key: str
    blueprint_hash: str
    target: str
    dtype: str
    backend: str
    artifact_digest: str | None
    ir: dict[str, Any]


class ValidateHandler:
    """The validate stage's handler; one per worker process (``close`` when done)."""

    def __init__(self, config: ValidateStageConfig) -> None:
        self.config = config
        self._public_key_pem: str | None = None
        self.runner = SandboxRunner(spares=config.spares, env=config.sandbox_env,
                                    cwd=config.sandbox_cwd)
        self._disk: DiskTier | None = None
        self._passthrough = passthrough.validate_handler()
        self._durable: DurableTier | None = None
        self._nc: NATS | None = None
        self._init_lock = asyncio.Lock()

    @property
    def public_key_pem(self) -> str:
        if self._public_key_pem is None:
            key = load_public_key(self.config.resolve_public_key())
            self._public_key_pem = public_pem(key).decode("ascii")
        return self._public_key_pem

    async def close(self) -> None:
        """Kill idle sandboxes and drain the NATS connection."""
        await self.runner.aclose()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.drain(), 5.0)

    async def __call__(self, event: ev.KernelCompiled, ctx: HandlerContext[Any]) -> None:
        if event.backend == passthrough.BACKEND:
            await self._passthrough(event, ctx)
            return
        row = await _lock_kernel(ctx.session, event.kernel_id)
        if row is None:
            raise Reject(f"kernel {event.kernel_id} is unknown")
        if (row.cache_key, row.blueprint_hash) != (event.cache_key, event.blueprint_hash):
            raise Reject(f"event names key {event.cache_key} / blueprint {event.blueprint_hash}, "
                         f"kernel {row.id} is {row.cache_key} / {row.blueprint_hash}")
        if row.status in DECIDED and await self._re_emit(event, row, ctx):
            return
        if row.status != "compiled":
            raise Reject(f"kernel {row.id} is {row.status!r}; only compiled kernels validate")
        started = time.perf_counter()
        digest = event.artifact_digest or row.artifact_digest
        packed, digest = await self._fetch(ctx.session, row, digest)
        try:
            report = await self.runner.validate(
                packed, expected=_expected(row, digest), blueprint=row.ir,
                public_key_pem=self.public_key_pem, policy=self.config.policy,
                heartbeat=ctx.heartbeat)
        except SandboxError as exc:
            raise Retry(f"validation sandbox failed: {exc}", delay=10.0) from exc
        self._defer_if_needed(row, report)
        duration_ms = (time.perf_counter() - started) * 1000
        await _record(_Job(ctx, event, row), report, digest=digest, duration_ms=duration_ms)

    # -- helpers ------------------------------------------------------------------------

    def _defer_if_needed(self, row: _KernelRow, report: r.ValidationReport) -> None:
        sandbox = report.check(r.SANDBOX)
        if sandbox is not None and sandbox.failed:
            raise Retry(f"this validator cannot validate kernel {row.id}: {sandbox.message}",
                        delay=30.0)
        cpu_only = row.target.startswith("cuda") and report.device == "cpu"
        if cpu_only and self.config.policy.cuda_on_cpu == "defer":
            raise Retry(f"kernel {row.id} targets {row.target}: left to a GPU validator "
                        "(cuda_on_cpu=defer)", delay=30.0)

    async def _durable_tier(self, session: AsyncSession) -> DurableTier:
        if self._durable is None:
            async with self._init_lock:
                if self._durable is None:
                    engine = engine_of(session)
                    if engine is None:
                        raise ConfigError("the validate handler needs a session bound to an "
                                          "engine")
                    sessions = async_sessionmaker(engine, expire_on_commit=False)
                    self._nc = await connect(self.config.resolve_nats_url(),
                                             name=f"esper-validate-{os.getpid()}")
                    self._durable = DurableTier(sessions, self._nc,
                                                bucket=self.config.durable_bucket)
        return self._durable

    async def _fetch(self, session: AsyncSession, row: _KernelRow, digest: str | None,
                     ) -> tuple[bytes, str]:
        """The artifact's bytes by digest (each tier checks sha256 == digest)."""
        digests = [digest] if digest else list((await session.scalars(
            select(Artifact.digest).where(Artifact.cache_key == row.cache_key)
            .order_by(Artifact.created_at.desc()))).all())
        if not digests:
            raise Retry(f"kernel {row.id} has no artifact digest yet", delay=5.0)
        if self._disk is None:
            self._disk = DiskTier(self.config.cache_dir)
        for d in digests:
            packed = await asyncio.to_thread(self._disk.get, d)
            if packed is None:
                packed = await (await self._durable_tier(session)).get(d)
            if packed is not None:
                return packed, d
        raise Retry(f"artifact {digests[0]} of kernel {row.id} is in no cache tier", delay=5.0)

    async def _re_emit(self, event: ev.KernelCompiled, row: _KernelRow,
                       ctx: HandlerContext[Any]) -> bool:
        """Emit the stored verdict of a decided kernel; False if none is stored."""
        stored = (await ctx.session.execute(
            select(Validation).where(Validation.kernel_id == row.id)
            .order_by(Validation.id.desc()).limit(1))).scalar_one_or_none()
        if stored is None or stored.device == "none":  # pass-through rows prove nothing
            return False
        checks = [r.CheckRecord.model_validate(c) for c in stored.checks]
        report = r.ValidationReport(device=stored.device, checks=checks)
        if report.passed != stored.passed:
            return False
        await _emit_and_log(_Job(ctx, event, row), report, digest=row.artifact_digest,
                            status=row.status, duration_ms=stored.duration_ms, cached=True)
        return True


def _expected(row: _KernelRow, digest: str) -> ExpectedKernel:
    return ExpectedKernel(cache_key=row.cache_key, blueprint_hash=row.blueprint_hash,
                          target=row.target, dtype=row.dtype, backend=row.backend, digest=digest)


async def _lock_kernel(session: AsyncSession, kernel_id: uuid.UUID) -> _KernelRow | None:
    found = (await session.execute(
        select(Kernel.id, Kernel.status, Kernel.cache_key, Kernel.blueprint_hash, Kernel.target,
               Kernel.dtype, Kernel.backend, Kernel.artifact_digest, Blueprint.ir)
        .join(Blueprint, Blueprint.hash == Kernel.blueprint_hash)
        .where(Kernel.id == kernel_id)
        .with_for_update(of=Kernel))).first()
    return None if found is None else _KernelRow(*found)


@dataclass(frozen=True)
class _Job:
    """One event being handled: its context, the event, the locked kernel row."""

    ctx: HandlerContext[Any]
    event: ev.KernelCompiled
    row: _KernelRow


async def _record(job: _Job, report: r.ValidationReport, *, digest: str,
                  duration_ms: float) -> None:
    ctx, row = job.ctx, job.row
    status = "validated" if report.passed else "rejected"
    await ctx.session.execute(insert(Validation).values(
        kernel_id=row.id, device=report.device, passed=report.passed,
        checks=[c.model_dump(mode="json") for c in report.checks],
        reasons=[x.model_dump(mode="json") for x in report.reasons()],
        duration_ms=duration_ms))
    await ctx.session.execute(
        update(Kernel).where(Kernel.id == row.id).values(status=status))
    await _emit_and_log(job, report, digest=digest, status=status, duration_ms=duration_ms,
                        cached=False, timings=report.timings, notes=report.notes)


async def _emit_and_log(job: _Job, report: r.ValidationReport, *, digest: str | None,
                        status: str, duration_ms: float | None, cached: bool,
                        **extra: Any) -> None:
    ctx, event, row = job.ctx, job.event, job.row
    detail = {
        "stage": ctx.stage, "event_id": str(event.event_id), "device": report.device,
        "passed": report.passed, "cached": cached, "duration_ms": duration_ms,
        "checks": [{"check": c.check, "status": c.status, "figure": c.figure, "bound": c.bound}
                   for c in report.checks],
        "reasons": [x.model_dump(mode="json") for x in report.reasons()], **extra,
    }
    await ctx.session.execute(insert(KernelEvent).values(
        kernel_id=row.id, event="validated" if report.passed else "rejected", status=status,
        correlation_id=event.correlation_id, detail=detail))
    if report.passed:
        ctx.emit(ev.KernelValidated(
            correlation_id=event.correlation_id, kernel_id=row.id, cache_key=row.cache_key,
            blueprint_hash=row.blueprint_hash, target=row.target, dtype=row.dtype,  # type: ignore[arg-type]
            backend=row.backend, artifact_digest=digest, checks=report.check_results(),
            device=report.device))
    else:
        ctx.emit(ev.KernelRejected(
            correlation_id=event.correlation_id, kernel_id=row.id, cache_key=row.cache_key,
            blueprint_hash=row.blueprint_hash, target=row.target, stage=STAGE,
            reasons=report.reasons()))


def make_validate_handler(settings: Settings, **overrides: Any) -> ValidateHandler:
    """The stage registry's factory (``esper worker validate``)."""
    return ValidateHandler(ValidateStageConfig.from_settings(settings, **overrides))
