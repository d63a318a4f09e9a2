"""The deploy stage: ``KernelValidated`` → a deployment row and ``KernelReady``;
and ``retire_kernel`` (``esper kernels retire KEY``) → ``KernelRetired``.

What a deployment decides, from the kernel row and its blueprint's IR:
- **seed schema**: the kernel's input/output tensor schemas (shape inference in
  the kernel's dtype). A kernel with one input and one output of the same shape
  and dtype can sit in a seed site of that schema (``seed`` in the row's JSON);
  any other kernel is still ready, but no trainer offers it to a site.
- **targets**: the kernel's own target; kernels of a portable backend (the torch
  reference, the pass-through) also serve every other target (``serves_target``,
  which trainers apply to the ``KernelReady`` they receive).
- **artifact location**: where a trainer fetches the signed bytes
  (``nats-object-store:<bucket>/<digest>``, from the ``artifacts`` row); None for
  a pass-through kernel, which has no artifact (trainers then build the module
  from the blueprint IR with the reference backend, and say so).

Kernel status moves compiled|validated → ready; a kernel already ready (a
resubmission walking every stage) is announced again (trainers de-duplicate by
cache key) with no second deployment; a retired, rejected or failed kernel is
never announced (a ``deploy_skipped`` kernel event says why)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from esper.bus import events as ev
from esper.db.models import Artifact, Blueprint, Deployment, Kernel, KernelEvent
from esper.errors import EsperError, Reject, Retry
from esper.workers import outbox
from esper.workers.handler import HandlerContext

log = logging.getLogger(__name__)

READY = "ready"
RETIRED = "retired"
DEPLOYABLE = ("compiled", "validated")
PORTABLE_BACKENDS = frozenset({"torch", "passthrough"})
"""Backends whose kernels run on any device (the torch reference interprets the IR)."""


def serves_target(kernel_target: str, backend: str, trainer_target: str) -> bool:
    """Whether a kernel built for ``kernel_target`` by ``backend`` may run in a
    trainer whose device is ``trainer_target`` (``cpu``, ``cuda:sm_90``)."""
    return kernel_target == trainer_target or backend in PORTABLE_BACKENDS


@dataclass(frozen=True)
class Schemas:
    inputs: list[ev.TensorSpec]
    outputs: list[ev.TensorSpec]

    @property
    def seed(self) -> ev.TensorSpec | None:
        """The site schema this kernel serves as a seed (one tensor in, the same out)."""
        if len(self.inputs) == 1 and self.outputs == self.inputs:
            return self.inputs[0]
        return None

    def to_json(self, *, portable: bool) -> dict[str, Any]:
        seed = self.seed
        return {
            "inputs": [t.model_dump(mode="json") for t in self.inputs],
            "outputs": [t.model_dump(mode="json") for t in self.outputs],
            "seed": None if seed is None else seed.model_dump(mode="json"),
            "portable": portable,
        }


def kernel_schemas(ir: dict[str, Any], dtype: str) -> Schemas:
    """Input and output schemas by the IR's shape inference; float tensors in the
    kernel's dtype (int64 and bool tensors keep theirs)."""
    from esper.ir import BlueprintIR

    blueprint = BlueprintIR.from_dict(ir)
    shapes = blueprint.infer_shapes()

    def spec(schema: Any) -> ev.TensorSpec:
        declared = schema.dtype.value
        kept = declared if declared in ("int64", "bool") else dtype
        return ev.TensorSpec(shape=tuple(schema.shape), dtype=kept)

    return Schemas(
        [spec(shapes[i.name]) for i in blueprint.inputs],
        [spec(shapes[name]) for name in blueprint.outputs],
    )


async def _record(
    session: AsyncSession, kernel_id: uuid.UUID, event: str, status: str, *,
    correlation_id: str | None, detail: dict[str, Any],
) -> None:
    await session.execute(
        insert(KernelEvent).values(
            kernel_id=kernel_id, event=event, status=status,
            correlation_id=correlation_id, detail=detail,
        )
    )


class DeployHandler:
    """The deploy stage's handler (see the module docstring)."""

    def __init__(self, schema_cache: int = 1024) -> None:
        self._schemas: dict[tuple[str, str], Schemas] = {}
        self._cache_size = schema_cache

    def schemas(self, blueprint_hash: str, ir: dict[str, Any], dtype: str) -> Schemas:
        key = (blueprint_hash, dtype)
        found = self._schemas.get(key)
        if found is None:
            if len(self._schemas) >= self._cache_size:
                self._schemas.pop(next(iter(self._schemas)))
            found = self._schemas[key] = kernel_schemas(ir, dtype)
        return found

    async def __call__(self, event: ev.KernelValidated, ctx: HandlerContext[Any]) -> None:
        s = ctx.session
        row = (
            await s.execute(
                select(Kernel.status, Kernel.cache_key, Kernel.artifact_digest, Blueprint.ir)
                .join(Blueprint, Blueprint.hash == Kernel.blueprint_hash)
                .where(Kernel.id == event.kernel_id)
                .with_for_update(of=Kernel)
            )
        ).one_or_none()
        if row is None:
            raise Reject(f"unknown kernel {event.kernel_id}")
        if row.cache_key != event.cache_key:
            raise Reject(f"kernel {event.kernel_id} has key {row.cache_key}, "
                         f"the event says {event.cache_key}")
        base = {"stage": ctx.stage, "event_id": str(event.event_id)}
        if row.status not in (*DEPLOYABLE, READY):
            log.info("kernel %s is %s: not deployed", event.kernel_id, row.status)
            await _record(s, event.kernel_id, "deploy_skipped", row.status,
                          correlation_id=event.correlation_id,
                          detail={**base, "reason": f"kernel is {row.status}"})
            return

        digest = event.artifact_digest or row.artifact_digest
        if row.artifact_digest not in (None, digest):
            raise Reject(f"validated artifact {event.artifact_digest} is not kernel "
                         f"{event.kernel_id}'s artifact {row.artifact_digest}")
        location = None
        if digest is not None:
            store = await s.scalar(select(Artifact.store).where(Artifact.digest == digest))
            if store is None:
                raise Retry(f"artifact {digest} of kernel {event.kernel_id} is not in the "
                            "durable store's table yet")
            location = f"{store}/{digest}"

        schemas = self.schemas(event.blueprint_hash, row.ir, event.dtype)
        seed_schema = schemas.to_json(portable=event.backend in PORTABLE_BACKENDS)
        first = row.status != READY
        if first:
            await s.execute(
                update(Kernel).where(Kernel.id == event.kernel_id)
                .values(status=READY, updated_at=func.now())
            )
        have = await s.scalar(
            select(exists().where(Deployment.kernel_id == event.kernel_id,
                                  Deployment.target == event.target,
                                  Deployment.status == "active"))
        )
        if not have:
            await s.execute(
                insert(Deployment).values(
                    kernel_id=event.kernel_id, target=event.target, seed_schema=seed_schema,
                    artifact_location=location, status="active",
                )
            )
        await _record(s, event.kernel_id, "ready", READY, correlation_id=event.correlation_id,
                      detail={**base, "artifact_location": location, "seed": seed_schema["seed"],
                              "portable": seed_schema["portable"], "redeployed": not first})
        ctx.emit(
            ev.KernelReady(
                correlation_id=event.correlation_id, kernel_id=event.kernel_id,
                cache_key=event.cache_key, blueprint_hash=event.blueprint_hash,
                target=event.target, dtype=event.dtype, backend=event.backend,
                input_schemas=schemas.inputs, output_schemas=schemas.outputs,
                artifact_digest=digest, artifact_location=location,
            )
        )


def make_deploy_handler(settings: object | None = None) -> DeployHandler:
    """The stage registry's factory (the deploy stage needs no settings)."""
    return DeployHandler()


# -- retiring ---------------------------------------------------------------------------


class KernelLookupError(EsperError, LookupError):
    """No kernel, or more than one, matches what ``retire`` was given."""


@dataclass(frozen=True)
class Retired:
    """What ``retire_kernel`` did: ``event`` is None when the kernel was retired already."""

    kernel_id: uuid.UUID
    cache_key: str
    name: str
    previous_status: str
    event: ev.KernelRetired | None


async def find_kernel(session: AsyncSession, key: str) -> Any:
    """The kernel whose cache key or id is ``key``, or whose cache key starts with
    it (at least 6 characters); KernelLookupError when none or several match."""
    key = key.strip().lower()
    conditions = [Kernel.cache_key == key]
    if len(key) >= 6:
        conditions.append(Kernel.cache_key.startswith(key, autoescape=True))
    try:
        conditions.append(Kernel.id == uuid.UUID(key))
    except ValueError:
        pass
    rows = (
        await session.execute(
            select(Kernel.id, Kernel.cache_key, Kernel.status, Blueprint.name)
            .join(Blueprint, Blueprint.hash == Kernel.blueprint_hash)
            .where(or_(*conditions))
            .with_for_update(of=Kernel)
        )
    ).all()
    exact = [r for r in rows if r.cache_key == key or str(r.id) == key]
    rows = exact or rows
    if not rows:
        raise KernelLookupError(f"no kernel has the key or id {key!r}")
    if len(rows) > 1:
        keys = ", ".join(r.cache_key[:16] for r in rows[:5])
        raise KernelLookupError(f"{key!r} matches {len(rows)} kernels ({keys}…): give more of it")
    return rows[0]


async def retire_kernel(session: AsyncSession, key: str, reason: str) -> Retired:
    """In the caller's transaction: mark the kernel and its deployments retired,
    record a ``retired`` kernel event and queue ``KernelRetired`` in the outbox.
    Idempotent: a retired kernel is left as it is (``event`` None)."""
    row = await find_kernel(session, key)
    if row.status == RETIRED:
        return Retired(row.id, row.cache_key, row.name, row.status, None)
    event = ev.KernelRetired(
        correlation_id=uuid.uuid4().hex, kernel_id=row.id, cache_key=row.cache_key, reason=reason
    )
    await session.execute(
        update(Kernel).where(Kernel.id == row.id).values(status=RETIRED, updated_at=func.now())
    )
    await session.execute(
        update(Deployment).where(Deployment.kernel_id == row.id).values(status=RETIRED)
    )
    await _record(session, row.id, RETIRED, RETIRED, correlation_id=event.correlation_id,
                  detail={"reason": reason, "previous_status": row.status,
                          "event_id": str(event.event_id)})
    await outbox.write(session, [event])
    return Retired(row.id, row.cache_key, row.name, row.status, event)
