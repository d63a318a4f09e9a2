"""Pass-through handlers for compile, validate and deploy: they record each
step in Postgres and emit the next event without compiling or checking
anything, so the pipeline runs end to end before the real stages exist.

Each is set-based: a batch costs a few statements, whatever its size (the
runtime calls ``handle_many``; one event is a batch of one). Kernel status
only moves forward (compiled → validated → ready); a repeated submission of
a known blueprint still walks every stage (one kernel_events row and one event
per step) but creates no second kernel, validation or deployment."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.exc import DBAPIError

from esper.bus import events as ev
from esper.errors import IRValidationError, Reject
from esper.workers import sqltext
from esper.workers.failures import sqlstate
from esper.workers.handler import HandlerContext

BACKEND = "passthrough"


def passthrough_cache_key(blueprint_hash: str, target: str, dtype: str) -> str:
    """sha256 of what a pass-through kernel depends on (its backend included,
    so a real backend's key for the same blueprint never collides with it)."""
    return hashlib.sha256(f"{blueprint_hash}|{target}|{dtype}|{BACKEND}".encode()).hexdigest()


def _blueprint(ir: dict[str, Any] | str) -> Any:
    from esper.ir import BlueprintIR

    return BlueprintIR.from_json(ir) if isinstance(ir, str) else BlueprintIR.from_dict(ir)


def _check_blueprint(event: ev.BlueprintSubmitted) -> None:
    """Reject a blueprint that is invalid or not the hash it claims."""
    try:
        actual = _blueprint(event.ir).canonical_hash()
    except IRValidationError as exc:
        raise Reject(f"invalid blueprint: {exc}") from exc
    if actual != event.blueprint_hash:
        raise Reject(f"blueprint hash mismatch: submitted {event.blueprint_hash}, is {actual}")


class _Statement:
    """SQL written with ``:name`` parameters, sent through ``ctx.fetch`` (asyncpg's
    ``$n`` placeholders, without the SQLAlchemy session machinery: most of a
    pass-through stage's CPU went there). SQLAlchemy's asyncpg dialect renders
    the placeholders once, at import."""

    def __init__(self, sql: str) -> None:
        compiled = text(sql).compile(dialect=asyncpg_dialect())
        self.sql = str(compiled)
        self.names: list[str] = list(compiled.positiontup or ())

    async def fetch(self, ctx: HandlerContext[Any], params: dict[str, Any]) -> Sequence[Any]:
        return await ctx.fetch(self.sql, *(params[n] for n in self.names))


class _Ready(NamedTuple):
    id: uuid.UUID
    moved: bool
    ir: Any


class _PassThrough:
    """A handler whose per-event form is a batch of one."""

    batch = 32  # messages per transaction it handles best (the runtime's default)
    # Transactions in flight per process: a few statements each, so one at a time
    # would leave a stage waiting on its own commits (the validate stage's
    # default is 1, for the real validator's sake).
    concurrency = 4
    # Seconds a transaction waits for company (while the rate makes company
    # likely): none downstream, where a stage takes each transaction of the
    # stage before as one burst (see esper.bus.publish.BURST_HEADER).
    linger = 0.0
    # Its only effects are its statements: the inbox claim may ride with the
    # first of them (esper.workers.handler).
    late_claim = True

    async def __call__(self, event: Any, ctx: HandlerContext[Any]) -> None:
        await self.handle_many([event], ctx)

    async def handle_many(self, events: Sequence[Any], ctx: HandlerContext[Any]) -> None:
        raise NotImplementedError


# One statement (one round trip) for the whole batch: upsert the blueprints,
# insert the new kernels (known ones, cache hits, come back as they are) and
# record a kernel_events row per (event, target, dtype) in input order. Within a
# batch only the first claim of a new kernel is a miss. Foreign keys are
# checked at the end of the statement, so parents and children may share it.
_COMPILE = _Statement(
    """
    WITH bp AS (
        INSERT INTO blueprints (hash, name, ir, submit_count)
        SELECT h, n, i, c
        FROM unnest(CAST(:hashes AS varchar[]), CAST(:names AS varchar[]),
                    CAST(:irs AS jsonb[]), CAST(:counts AS int[])) AS x(h, n, i, c)
        ON CONFLICT (hash) DO UPDATE
        SET last_submitted_at = now(),
            submit_count = blueprints.submit_count + EXCLUDED.submit_count
    ), new AS (
        INSERT INTO kernels (id, blueprint_hash, cache_key, target, dtype, backend, status)
        SELECT i, h, k, t, d, :backend, 'compiled'
        FROM unnest(CAST(:ids AS uuid[]), CAST(:kernel_hashes AS varchar[]),
                    CAST(:keys AS varchar[]), CAST(:targets AS varchar[]),
                    CAST(:dtypes AS varchar[])) AS x(i, h, k, t, d)
        ON CONFLICT (cache_key) DO NOTHING
        RETURNING id, cache_key, status
    ), claimed AS (
        SELECT id, cache_key, status, true AS created FROM new
        UNION ALL
        SELECT id, cache_key, status, false FROM kernels
        WHERE cache_key = ANY(CAST(:keys AS varchar[]))
          AND cache_key NOT IN (SELECT cache_key FROM new)
    ), wanted AS (
        SELECT w.n, c.id, c.status, w.cid, w.eid,
               NOT c.created OR row_number() OVER (PARTITION BY w.key ORDER BY w.n) > 1 AS hit
        FROM unnest(CAST(:wanted_keys AS varchar[]), CAST(:correlation_ids AS varchar[]),
                    CAST(:event_ids AS varchar[])) WITH ORDINALITY AS w(key, cid, eid, n)
        JOIN claimed c ON c.cache_key = w.key
    ), recorded AS (
        INSERT INTO kernel_events (kernel_id, event, status, correlation_id, detail)
        SELECT id, 'compiled', status, cid,
               jsonb_build_object('stage', CAST(:stage AS varchar), 'cache_hit', hit,
                                  'event_id', eid)
        FROM wanted ORDER BY n
    )
    SELECT n, id, hit FROM wanted ORDER BY n
    """
)


class CompilePassThrough(_PassThrough):
    """compile: upsert the blueprints, claim one kernel per (target, dtype) (an
    existing one is a cache hit), emit KernelCompiled for each."""

    # The head of the pipeline: submissions arrive one by one, and the groups
    # formed here travel through every later stage as they are (200 events/s:
    # ~4 per transaction instead of ~2 with the runtime's 6 ms at every stage).
    # 15 ms, not 20: p99 44 against 54 ms at 200 events/s (medians of 5
    # interleaved runs) for 7% more CPU, on 2 cores with room to spare; 61
    # against 64 ms when they had none. 10 and 12 ms cost more CPU and were
    # no faster (benchmarks/RESULTS.md, "Event pipeline").
    linger = 0.015

    def __init__(self, targets: Sequence[str] = ("cpu",)) -> None:
        self.targets = tuple(targets)

    async def handle_many(
        self, events: Sequence[ev.BlueprintSubmitted], ctx: HandlerContext[Any]
    ) -> None:
        started = time.perf_counter()
        for event in events:
            _check_blueprint(event)
        counts = Counter(e.blueprint_hash for e in events)
        firsts = {e.blueprint_hash: e for e in reversed(events)}
        wanted = [
            (e, target, dtype, passthrough_cache_key(e.blueprint_hash, target, dtype))
            for e in events
            for target in self.targets
            for dtype in e.dtypes
        ]
        unique = {key: (e.blueprint_hash, target, dtype) for e, target, dtype, key in wanted}
        result = await _COMPILE.fetch(
            ctx,
            {
                "hashes": list(counts),
                "names": [firsts[h].name for h in counts],
                "irs": [json.dumps(firsts[h].ir) for h in counts],
                "counts": list(counts.values()),
                "backend": BACKEND,
                "ids": [uuid.uuid4() for _ in unique],
                "kernel_hashes": [v[0] for v in unique.values()],
                "keys": list(unique),
                "targets": [v[1] for v in unique.values()],
                "dtypes": [v[2] for v in unique.values()],
                "wanted_keys": [w[3] for w in wanted],
                "correlation_ids": [w[0].correlation_id for w in wanted],
                "event_ids": [str(w[0].event_id) for w in wanted],
                "stage": ctx.stage,
            },
        )
        claims = {r[0]: r for r in result}  # n -> (n, kernel id, cache hit)
        if len(claims) != len(wanted):  # a kernel neither inserted nor found
            raise RuntimeError(f"claimed {len(claims)} of {len(wanted)} kernels")
        compile_ms = (time.perf_counter() - started) * 1000 / len(events)
        for n, (event, target, dtype, key) in enumerate(wanted, 1):
            _, kernel_id, hit = claims[n]
            ctx.emit(
                ev.KernelCompiled(
                    correlation_id=event.correlation_id, kernel_id=kernel_id, cache_key=key,
                    blueprint_hash=event.blueprint_hash, target=target, dtype=dtype,
                    backend=BACKEND, cache_hit=hit, compile_ms=compile_ms,
                )
            )


def _unknown(events: Sequence[Any], found: set[uuid.UUID]) -> None:
    missing = [str(e.kernel_id) for e in events if e.kernel_id not in found]
    if missing:
        raise Reject(f"unknown kernel(s): {', '.join(missing)}")


def _details(events: Sequence[Any], stage: str) -> list[str]:
    return [json.dumps({"stage": stage, "event_id": str(e.event_id)}) for e in events]


_FOREIGN_KEY_VIOLATION = "23503"


def _validate_sql(events: Sequence[ev.KernelCompiled], stage: str) -> str:
    """Move the kernels to validated, record a passing validation for each
    kernel moved and a kernel_events row per event, in input order; values
    inline, nothing returned, so the statement rides with the COMMIT. An
    unknown kernel breaks kernel_events' foreign key: the statement fails."""
    rows = ",".join(
        f"({n},{sqltext.uuid_literal(e.kernel_id)},{sqltext.text_literal(e.correlation_id)},"
        f"{sqltext.text_literal(d)}::jsonb)"
        for n, (e, d) in enumerate(zip(events, _details(events, stage), strict=True))
    )
    return f"""
    WITH x(n, k, c, d) AS (VALUES {rows}),
    moved AS (
        UPDATE kernels SET status = 'validated', updated_at = now()
        WHERE id IN (SELECT k FROM x) AND status = 'compiled'
        RETURNING id
    ), checked AS (
        INSERT INTO validations (kernel_id, device, passed, checks, reasons)
        SELECT id, 'none', true, '[]', '[]' FROM moved
    )
    INSERT INTO kernel_events (kernel_id, event, status, correlation_id, detail)
    SELECT x.k, 'validated',
           CASE WHEN m.id IS NULL THEN coalesce(k.status, 'unknown') ELSE 'validated' END,
           x.c, x.d
    FROM x LEFT JOIN moved m ON m.id = x.k LEFT JOIN kernels k ON k.id = x.k
    ORDER BY x.n;
    """


class ValidatePassThrough(_PassThrough):
    """validate: record a passing validation with no checks, emit KernelValidated.

    Its one statement needs no answer, so it goes with the COMMIT, and the
    whole transaction is one round trip (esper.workers.txn)."""

    async def handle_many(
        self, events: Sequence[ev.KernelCompiled], ctx: HandlerContext[Any]
    ) -> None:
        try:
            await ctx.execute_at_commit(_validate_sql(events, ctx.stage))
        except (asyncpg.PostgresError, DBAPIError) as exc:
            # Sent at once: the runtime's next try after the statement failed
            # at the commit. The runtime then takes the events one at a time,
            # and this names the kernel at fault.
            if sqlstate(exc) != _FOREIGN_KEY_VIOLATION:
                raise
            ids = ", ".join(str(e.kernel_id) for e in events)
            raise Reject(f"unknown kernel(s): {ids}") from exc
        for e in events:
            ctx.emit(
                ev.KernelValidated(
                    correlation_id=e.correlation_id, kernel_id=e.kernel_id,
                    cache_key=e.cache_key, blueprint_hash=e.blueprint_hash, target=e.target,
                    dtype=e.dtype, backend=e.backend, artifact_digest=e.artifact_digest,
                    checks=[], device="none",
                )
            )


_READY = _Statement(
    """
    WITH moved AS (
        UPDATE kernels SET status = 'ready', updated_at = now()
        WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('compiled', 'validated')
        RETURNING id
    ), cur AS (
        SELECT k.id, k.blueprint_hash, m.id IS NOT NULL AS moved,
               CASE WHEN m.id IS NULL THEN k.status ELSE 'ready' END AS status
        FROM kernels k LEFT JOIN moved m ON m.id = k.id
        WHERE k.id = ANY(CAST(:ids AS uuid[]))
    ), recorded AS (
        INSERT INTO kernel_events (kernel_id, event, status, correlation_id, detail)
        SELECT x.k, 'ready', cur.status, x.c, x.d
        FROM unnest(CAST(:ids AS uuid[]), CAST(:correlation_ids AS varchar[]),
                    CAST(:details AS jsonb[])) AS x(k, c, d)
        JOIN cur ON cur.id = x.k
    )
    SELECT cur.id, cur.moved, b.ir FROM cur JOIN blueprints b ON b.hash = cur.blueprint_hash
    """
)

def _deploy_sql(deployed: dict[uuid.UUID, tuple[str, str]]) -> str:
    """The deployments of the newly ready kernels, one statement with its
    values inline: it returns nothing, so it rides with the COMMIT."""
    values = ",".join(
        f"({sqltext.uuid_literal(k)},{sqltext.text_literal(t)},{sqltext.text_literal(s)}::jsonb)"
        for k, (t, s) in deployed.items()
    )
    return f"INSERT INTO deployments (kernel_id, target, seed_schema) VALUES {values};"


class DeployPassThrough(_PassThrough):
    """deploy: mark the kernels ready, record a deployment for each newly
    ready one, emit KernelReady with the kernel's input/output schemas."""

    def __init__(self, cache_size: int = 4096) -> None:
        # Shape inference per (blueprint, dtype), remembered: kernels of one
        # blueprint are many, and re-deploys are common.
        self._schemas: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
        self._cache_size = cache_size

    def schemas(self, blueprint_hash: str, ir: Any, dtype: str) -> tuple[list[Any], list[Any]]:
        key = (blueprint_hash, dtype)
        found = self._schemas.get(key)
        if found is None:
            if len(self._schemas) >= self._cache_size:
                self._schemas.pop(next(iter(self._schemas)))
            found = self._schemas[key] = _schemas(ir, dtype)
        return found

    async def handle_many(
        self, events: Sequence[ev.KernelValidated], ctx: HandlerContext[Any]
    ) -> None:
        result = await _READY.fetch(
            ctx,
            {
                "ids": [e.kernel_id for e in events],
                "correlation_ids": [e.correlation_id for e in events],
                "details": _details(events, ctx.stage),
            },
        )
        found = {r[0]: _Ready(*r) for r in result}
        _unknown(events, set(found))
        deployed: dict[uuid.UUID, tuple[str, str]] = {}
        for e in events:
            inputs, outputs = self.schemas(e.blueprint_hash, found[e.kernel_id].ir, e.dtype)
            if found[e.kernel_id].moved and e.kernel_id not in deployed:
                schema = {
                    "inputs": [t.model_dump() for t in inputs],
                    "outputs": [t.model_dump() for t in outputs],
                }
                deployed[e.kernel_id] = (e.target, json.dumps(schema))
            ctx.emit(
                ev.KernelReady(
                    correlation_id=e.correlation_id, kernel_id=e.kernel_id,
                    cache_key=e.cache_key, blueprint_hash=e.blueprint_hash, target=e.target,
                    dtype=e.dtype, backend=e.backend, input_schemas=inputs,
                    output_schemas=outputs, artifact_digest=e.artifact_digest,
                    artifact_location=None,
                )
            )
        if deployed:
            await ctx.execute_at_commit(_deploy_sql(deployed))


def _schemas(
    ir: dict[str, Any] | str, dtype: str
) -> tuple[list[ev.TensorSpec], list[ev.TensorSpec]]:
    """Input and output schemas by the IR's shape inference, floats in the
    kernel's dtype (integer and bool tensors keep theirs)."""

    def spec(schema: Any) -> ev.TensorSpec:
        declared = schema.dtype.value
        kept = declared if declared in ("int64", "bool") else dtype
        return ev.TensorSpec(shape=tuple(schema.shape), dtype=kept)  # type: ignore[arg-type]

    blueprint = _blueprint(ir)
    shapes = blueprint.infer_shapes()
    return (
        [spec(shapes[i.name]) for i in blueprint.inputs],
        [spec(shapes[name]) for name in blueprint.outputs],
    )


def compile_handler(targets: Sequence[str] = ("cpu",)) -> CompilePassThrough:
    return CompilePassThrough(targets)


def validate_handler() -> ValidatePassThrough:
    return ValidatePassThrough()


def deploy_handler() -> DeployPassThrough:
    return DeployPassThrough()
