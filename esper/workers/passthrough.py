"""Pass-through handlers for compile, validate and deploy: they record each
step in Postgres and emit the next event without compiling or checking
anything, so the pipeline runs end to end before the real stages exist.

Kernel status only moves forward (compiled → validated → ready); a repeated
submission of a known blueprint still walks every stage (one kernel_events row
and one event per step) but creates no second kernel or deployment."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert

from esper.bus import events as ev
from esper.db.models import Blueprint, Deployment, Kernel, KernelEvent, Validation
from esper.errors import IRValidationError, Reject
from esper.workers.runtime import Handler, HandlerContext

BACKEND = "passthrough"

_blueprints = Blueprint.__table__
_kernels = Kernel.__table__
_kernel_events = KernelEvent.__table__
_validations = Validation.__table__
_deployments = Deployment.__table__


def passthrough_cache_key(blueprint_hash: str, target: str, dtype: str) -> str:
    """sha256 of what a pass-through kernel depends on (its backend included,
    so a real backend's key for the same blueprint never collides with it)."""
    return hashlib.sha256(f"{blueprint_hash}|{target}|{dtype}|{BACKEND}".encode()).hexdigest()


def _check_blueprint(event: ev.BlueprintSubmitted) -> Any:
    """The parsed blueprint; Reject if it is invalid or not the hash it claims."""
    from esper.ir import BlueprintIR

    try:
        blueprint = BlueprintIR.from_dict(event.ir)
    except IRValidationError as exc:
        raise Reject(f"invalid blueprint: {exc}") from exc
    actual = blueprint.canonical_hash()
    if actual != event.blueprint_hash:
        raise Reject(f"blueprint hash mismatch: submitted {event.blueprint_hash}, is {actual}")
    return blueprint


async def _record(
    ctx: HandlerContext[Any], kernel_id: uuid.UUID, event: str, status: str,
    correlation_id: str, **detail: Any,
) -> None:
    await ctx.session.execute(
        insert(_kernel_events).values(
            kernel_id=kernel_id, event=event, status=status,
            correlation_id=correlation_id, detail={"stage": ctx.stage, **detail},
        )
    )


# Move a kernel's status forward from one of :from_states; returns the status
# it has afterwards (moved or not) and whether it moved. No row: kernel unknown.
_ADVANCE = text(
    """
    WITH moved AS (
        UPDATE kernels SET status = :to, updated_at = now()
        WHERE id = :id AND status = ANY(:from_states)
        RETURNING status
    )
    SELECT status, true AS moved FROM moved
    UNION ALL
    SELECT status, false FROM kernels WHERE id = :id AND NOT EXISTS (SELECT 1 FROM moved)
    """
)


async def _advance(
    ctx: HandlerContext[Any], kernel_id: uuid.UUID, to: str, from_states: Sequence[str]
) -> tuple[str, bool]:
    row = (
        await ctx.session.execute(
            _ADVANCE, {"id": kernel_id, "to": to, "from_states": list(from_states)}
        )
    ).first()
    if row is None:
        raise Reject(f"kernel {kernel_id} is unknown")
    return row.status, row.moved


def compile_handler(targets: Sequence[str] = ("cpu",)) -> Handler:
    """compile: upsert the blueprint, claim one kernel per (target, dtype) (an
    existing one is a cache hit), emit KernelCompiled for each."""
    targets = tuple(targets)

    async def handle(event: ev.BlueprintSubmitted, ctx: HandlerContext[Any]) -> None:
        started = time.perf_counter()
        _check_blueprint(event)
        s = ctx.session
        upsert = insert(_blueprints).values(
            hash=event.blueprint_hash, name=event.name, ir=event.ir
        )
        await s.execute(
            upsert.on_conflict_do_update(
                index_elements=["hash"],
                set_={
                    "last_submitted_at": func.now(),
                    "submit_count": _blueprints.c.submit_count + 1,
                },
            )
        )
        for target in targets:
            for dtype in event.dtypes:
                key = passthrough_cache_key(event.blueprint_hash, target, dtype)
                claim = (
                    insert(_kernels)
                    .values(
                        id=uuid.uuid4(), blueprint_hash=event.blueprint_hash, cache_key=key,
                        target=target, dtype=dtype, backend=BACKEND, status="compiled",
                    )
                    .on_conflict_do_nothing(index_elements=["cache_key"])
                    .returning(_kernels.c.id, _kernels.c.status)
                )
                row = (await s.execute(claim)).first()
                cache_hit = row is None
                if row is None:
                    row = (
                        await s.execute(
                            select(_kernels.c.id, _kernels.c.status).where(
                                _kernels.c.cache_key == key
                            )
                        )
                    ).one()
                compile_ms = (time.perf_counter() - started) * 1000
                await _record(
                    ctx, row.id, "compiled", row.status, event.correlation_id,
                    cache_hit=cache_hit, event_id=str(event.event_id),
                )
                ctx.emit(
                    ev.KernelCompiled(
                        correlation_id=event.correlation_id, kernel_id=row.id, cache_key=key,
                        blueprint_hash=event.blueprint_hash, target=target, dtype=dtype,
                        backend=BACKEND, cache_hit=cache_hit, compile_ms=compile_ms,
                    )
                )

    return handle


def validate_handler() -> Handler:
    """validate: record a passing validation with no checks, emit KernelValidated."""

    async def handle(event: ev.KernelCompiled, ctx: HandlerContext[Any]) -> None:
        status, moved = await _advance(ctx, event.kernel_id, "validated", ("compiled",))
        if moved:
            await ctx.session.execute(
                insert(_validations).values(
                    kernel_id=event.kernel_id, device="none", passed=True, checks=[], reasons=[]
                )
            )
        await _record(
            ctx, event.kernel_id, "validated", status, event.correlation_id,
            event_id=str(event.event_id),
        )
        ctx.emit(
            ev.KernelValidated(
                correlation_id=event.correlation_id, kernel_id=event.kernel_id,
                cache_key=event.cache_key, blueprint_hash=event.blueprint_hash,
                target=event.target, dtype=event.dtype, backend=event.backend,
                artifact_digest=event.artifact_digest, checks=[], device="none",
            )
        )

    return handle


def deploy_handler() -> Handler:
    """deploy: mark the kernel ready, record a deployment, emit KernelReady
    with the kernel's input/output schemas."""

    async def handle(event: ev.KernelValidated, ctx: HandlerContext[Any]) -> None:
        status, moved = await _advance(
            ctx, event.kernel_id, "ready", ("compiled", "validated")
        )
        ir = (
            await ctx.session.execute(
                select(_blueprints.c.ir).where(_blueprints.c.hash == event.blueprint_hash)
            )
        ).scalar_one()
        inputs, outputs = _schemas(ir, event.dtype)
        if moved:
            await ctx.session.execute(
                insert(_deployments).values(
                    kernel_id=event.kernel_id, target=event.target,
                    seed_schema={
                        "inputs": [t.model_dump() for t in inputs],
                        "outputs": [t.model_dump() for t in outputs],
                    },
                )
            )
        await _record(
            ctx, event.kernel_id, "ready", status, event.correlation_id,
            event_id=str(event.event_id),
        )
        ctx.emit(
            ev.KernelReady(
                correlation_id=event.correlation_id, kernel_id=event.kernel_id,
                cache_key=event.cache_key, blueprint_hash=event.blueprint_hash,
                target=event.target, dtype=event.dtype, backend=event.backend,
                input_schemas=inputs, output_schemas=outputs,
                artifact_digest=event.artifact_digest, artifact_location=None,
            )
        )

    return handle


def _schemas(ir: dict[str, Any], dtype: str) -> tuple[list[ev.TensorSpec], list[ev.TensorSpec]]:
    """Input and output schemas by the IR's shape inference, floats in the
    kernel's dtype (integer and bool tensors keep theirs)."""
    from esper.ir import BlueprintIR

    def spec(schema: Any) -> ev.TensorSpec:
        declared = schema.dtype.value
        kept = declared if declared in ("int64", "bool") else dtype
        return ev.TensorSpec(shape=tuple(schema.shape), dtype=kept)  # type: ignore[arg-type]

    blueprint = BlueprintIR.from_dict(ir)
    shapes = blueprint.infer_shapes()
    return (
        [spec(shapes[i.name]) for i in blueprint.inputs],
        [spec(shapes[name]) for name in blueprint.outputs],
    )
