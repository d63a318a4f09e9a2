"""Every event on the wire and the subject it travels on, in one module.

Events are frozen pydantic models serialised as JSON (never pickle). ``event_id``
is the JetStream ``Nats-Msg-Id``, so a re-published event is deduplicated;
``correlation_id`` follows one blueprint's journey through every stage."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from esper.errors import MalformedEvent

SCHEMA_VERSION = 1

# Bigger events are refused on both ends; blueprints are small graphs, and a
# payload this large is a mistake or an attack (NATS' own limit is 1 MiB).
MAX_EVENT_BYTES = 512 * 1024

BLUEPRINT_SUBMITTED = "esper.blueprint.submitted"
KERNEL_COMPILED = "esper.kernel.compiled"
KERNEL_VALIDATED = "esper.kernel.validated"
KERNEL_REJECTED = "esper.kernel.rejected"
KERNEL_READY = "esper.kernel.ready"
KERNEL_RETIRED = "esper.kernel.retired"
SEED_PREFIX = "esper.seed."
DLQ_PREFIX = "esper.dlq."

DTypeName = Literal["float32", "float16", "bfloat16", "int64", "bool"]
Dim = int | str


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EsperEvent(_Frozen):
    """Fields every event carries. Subclasses set ``SUBJECT`` (or override
    ``subject`` when the subject depends on the event, as for seed events)."""

    SUBJECT: ClassVar[str] = ""

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    schema_version: int = SCHEMA_VERSION
    correlation_id: str = Field(min_length=1, max_length=64)
    occurred_at: AwareDatetime = Field(default_factory=_utcnow)

    @property
    def subject(self) -> str:
        return self.SUBJECT


class CheckResult(_Frozen):
    """One validation check: what was measured against which bound."""

    check: str
    passed: bool
    figure: float | None = None
    bound: float | None = None
    message: str | None = None


class RejectReason(_Frozen):
    check: str
    message: str
    figure: float | None = None
    bound: float | None = None


class TensorSpec(_Frozen):
    """A tensor's schema as a kernel consumer sees it (symbolic dims stay strings)."""

    shape: tuple[Dim, ...]
    dtype: DTypeName


class BlueprintSubmitted(EsperEvent):
    SUBJECT: ClassVar[str] = BLUEPRINT_SUBMITTED

    blueprint_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = Field(min_length=1, max_length=200)
    ir: dict[str, Any]
    dtypes: tuple[DTypeName, ...] = Field(default=("float32",), min_length=1)
    submitted_by: str | None = None


class _KernelFacts(EsperEvent):
    kernel_id: uuid.UUID
    cache_key: str = Field(min_length=1, max_length=64)
    blueprint_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    target: str
    dtype: DTypeName
    backend: str


class KernelCompiled(_KernelFacts):
    SUBJECT: ClassVar[str] = KERNEL_COMPILED

    artifact_digest: str | None = None
    cache_hit: bool = False
    compile_ms: float | None = None


class KernelValidated(_KernelFacts):
    SUBJECT: ClassVar[str] = KERNEL_VALIDATED

    artifact_digest: str | None = None
    checks: list[CheckResult] = Field(default_factory=list)
    device: str


class KernelRejected(EsperEvent):
    SUBJECT: ClassVar[str] = KERNEL_REJECTED

    kernel_id: uuid.UUID | None = None
    cache_key: str | None = None
    blueprint_hash: str
    target: str | None = None
    stage: str
    reasons: list[RejectReason] = Field(min_length=1)


class KernelReady(_KernelFacts):
    SUBJECT: ClassVar[str] = KERNEL_READY

    input_schemas: list[TensorSpec] = Field(default_factory=list)
    output_schemas: list[TensorSpec] = Field(default_factory=list)
    artifact_digest: str | None = None
    artifact_location: str | None = None


class KernelRetired(EsperEvent):
    SUBJECT: ClassVar[str] = KERNEL_RETIRED

    kernel_id: uuid.UUID
    cache_key: str
    reason: str


class SeedEventMsg(EsperEvent):
    """A seed's lifecycle transition; travels on ``esper.seed.<event>``."""

    run_id: str
    site: str
    seed: int
    event: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    from_state: str | None = None
    to_state: str
    step: int
    kernel_cache_key: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)

    @property
    def subject(self) -> str:
        return f"{SEED_PREFIX}{self.event}"


class DeadLettered(EsperEvent):
    """Notice that a stage gave up on a message; the full payload is in the
    ``dead_letters`` table, this carries the reason and an excerpt."""

    stage: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    subject_of_message: str
    original_event_id: str | None = None
    reason: str
    delivery_count: int
    stream_seq: int | None = None
    payload_size: int
    payload_excerpt: str

    @property
    def subject(self) -> str:
        return f"{DLQ_PREFIX}{self.stage}"


# Subject → event class, for decoding. Seed and dead-letter subjects are prefixes.
EVENT_TYPES: dict[str, type[EsperEvent]] = {
    cls.SUBJECT: cls
    for cls in (
        BlueprintSubmitted,
        KernelCompiled,
        KernelValidated,
        KernelRejected,
        KernelReady,
        KernelRetired,
    )
}


def event_type_for(subject: str) -> type[EsperEvent]:
    """The event class that travels on ``subject``; MalformedEvent if none does."""
    if subject in EVENT_TYPES:
        return EVENT_TYPES[subject]
    if subject.startswith(SEED_PREFIX):
        return SeedEventMsg
    if subject.startswith(DLQ_PREFIX):
        return DeadLettered
    raise MalformedEvent(subject, "no event type travels on this subject")


def encode(event: EsperEvent) -> bytes:
    """JSON bytes of ``event`` (UUIDs and datetimes as ISO strings)."""
    data = event.model_dump_json().encode()
    if len(data) > MAX_EVENT_BYTES:
        raise MalformedEvent(
            event.subject, f"event is {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit"
        )
    return data


def decode(subject: str, data: bytes) -> EsperEvent:
    """The event in ``data`` received on ``subject``. Raises MalformedEvent naming
    the subject and what is wrong: too big, not JSON, wrong shape, wrong subject."""
    cls = event_type_for(subject)
    if len(data) > MAX_EVENT_BYTES:
        raise MalformedEvent(
            subject, f"payload is {len(data)} bytes, over the {MAX_EVENT_BYTES}-byte limit"
        )
    try:
        event = cls.model_validate_json(data)
    except ValidationError as exc:
        raise MalformedEvent(subject, _describe(exc, cls)) from exc
    if event.schema_version != SCHEMA_VERSION:
        raise MalformedEvent(
            subject,
            f"schema_version {event.schema_version} is not supported (expected {SCHEMA_VERSION})",
        )
    if event.subject != subject:
        raise MalformedEvent(subject, f"{cls.__name__} belongs on {event.subject}")
    return event


def _describe(exc: ValidationError, cls: type[EsperEvent]) -> str:
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return f"payload is not JSON ({errors[0]['msg']})"
    if errors and errors[0]["type"] == "model_type":
        return f"payload is not a JSON object ({errors[0]['msg']})"
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors[:5]
    )
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"not a valid {cls.__name__}: {problems}{more}"


def peek_ids(data: bytes) -> tuple[str | None, str | None]:
    """Best-effort ``(event_id, correlation_id)`` of a payload that may not
    decode, for the logs and dead letters of malformed messages."""
    try:
        raw = json.loads(data[:MAX_EVENT_BYTES])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, None
    if not isinstance(raw, dict):
        return None, None
    found = (raw.get("event_id"), raw.get("correlation_id"))
    return tuple(v if isinstance(v, str) and len(v) <= 64 else None for v in found)  # type: ignore[return-value]
