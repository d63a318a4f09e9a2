"""The JetStream layout: streams and one durable pull consumer per stage,
created or updated idempotently by every process at start-up."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from esper.bus import events as ev
from esper.errors import ConfigError

log = logging.getLogger(__name__)

DAY = 86_400.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    max_age: float
    description: str


# Limits retention everywhere: a stream is history (a late trainer replays
# kernel.ready), not a work queue; consumers track their own progress.
STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("ESPER_BLUEPRINTS", ("esper.blueprint.>",), 30 * DAY, "submitted blueprints"),
    StreamSpec("ESPER_KERNELS", ("esper.kernel.>",), 30 * DAY, "kernel lifecycle history"),
    StreamSpec("ESPER_SEEDS", (f"{ev.SEED_PREFIX}>",), 30 * DAY, "seed lifecycle events"),
    StreamSpec("ESPER_DLQ", (f"{ev.DLQ_PREFIX}>",), 90 * DAY, "dead-letter notices"),
)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


@functools.lru_cache(maxsize=1024)
def stream_of(subject: str, streams: tuple[StreamSpec, ...] = STREAMS) -> str | None:
    """The name of the stream that stores ``subject`` (None: none of ``streams``).
    Cached: the relay asks it for every row it publishes, of a few dozen subjects."""
    for spec in streams:
        if any(subject_matches(p, subject) for p in spec.subjects):
            return spec.name
    return None


@dataclass(frozen=True)
class ConsumerSpec:
    """The durable consumer one stage's workers share (named after the stage)."""

    stage: str
    stream: str
    filter_subject: str

    @property
    def event_type(self) -> type[ev.EsperEvent]:
        return ev.event_type_for(self.filter_subject)


CONSUMERS: dict[str, ConsumerSpec] = {
    spec.stage: spec
    for spec in (
        ConsumerSpec("compile", "ESPER_BLUEPRINTS", ev.BLUEPRINT_SUBMITTED),
        ConsumerSpec("validate", "ESPER_KERNELS", ev.KERNEL_COMPILED),
        ConsumerSpec("deploy", "ESPER_KERNELS", ev.KERNEL_VALIDATED),
    )
}


def consumer_spec(stage: str) -> ConsumerSpec:
    try:
        return CONSUMERS[stage]
    except KeyError:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(CONSUMERS)}") from None


@dataclass(frozen=True)
class DeliveryPolicy:
    """How long a delivery may stay unacked and how often it is retried.

    ``ack_wait`` bounds a silent worker (crashed or hung); long handlers keep
    their messages with ``in_progress()`` heartbeats. A handler's failure is
    nak'ed with ``nak_delays[n]`` (the retry backoff). The consumer gets no
    server-side ``backoff`` list: with one set, nats-server 2.15 ignores a
    nak's delay from the second redelivery on and waits ``backoff[n]`` instead
    (measured: nak(0.2) with backoff [30, 60] came back after 30 s, then 60 s)."""

    ack_wait: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 2000
    nak_delays: tuple[float, ...] = (0.5, 2.0, 5.0, 15.0, 30.0)

    def __post_init__(self) -> None:
        if self.ack_wait <= 0 or self.max_deliver < 2 or not self.nak_delays:
            raise ConfigError(f"invalid delivery policy {self}")

    def nak_delay(self, num_delivered: int) -> float:
        return self.nak_delays[min(max(num_delivered, 1), len(self.nak_delays)) - 1]


@dataclass(frozen=True)
class Topology:
    """Stream/consumer settings: ``replicas`` 1 for an embedded server, 3 in a
    cluster; ``duplicate_window`` bounds how late a re-published outbox row is
    still dropped as a duplicate (the inbox catches any later one)."""

    replicas: int = 1
    duplicate_window: float = 300.0
    policy: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    streams: tuple[StreamSpec, ...] = STREAMS

    def stream_config(self, spec: StreamSpec) -> StreamConfig:
        return StreamConfig(
            name=spec.name,
            description=spec.description,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=spec.max_age,
            # The server's max_payload (1 MiB) bounds messages; consumers refuse
            # anything over MAX_EVENT_BYTES themselves, with a dead letter.
            max_msg_size=-1,
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            # Atomic batches (nats-server 2.12+): a relay's or a submitter's run of
            # messages is stored with one round of fsyncs (esper.bus.publish).
            allow_atomic=True,
        )

    def consumer_config(self, spec: ConsumerSpec) -> ConsumerConfig:
        p = self.policy
        return ConsumerConfig(
            name=spec.stage,
            durable_name=spec.stage,
            description=f"esper {spec.stage} workers",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=spec.filter_subject,
            ack_wait=p.ack_wait,
            max_deliver=p.max_deliver,
            max_ack_pending=p.max_ack_pending,
            max_waiting=512,
        )


async def ensure_streams(
    js: JetStreamContext, topology: Topology, *, update: bool = True
) -> None:
    """Create each stream, or update it in place when its config drifted
    (``update=False``: only create missing ones, as a mere publisher should)."""
    for spec in topology.streams:
        want = topology.stream_config(spec)
        try:
            info = await js.stream_info(spec.name)
        except NotFoundError:
            try:
                await js.add_stream(want)
                log.info("created stream %s", spec.name)
                continue
            except BadRequestError:
                info = await js.stream_info(spec.name)  # another process won the race
        if update and _stream_drifted(info.config, want):
            await js.update_stream(want)
            log.info("updated stream %s", spec.name)


def _stream_drifted(have: StreamConfig, want: StreamConfig) -> bool:
    keys = (
        "subjects", "max_age", "max_msg_size", "num_replicas", "duplicate_window", "allow_atomic"
    )
    return any(getattr(have, k) != getattr(want, k) for k in keys)


async def ensure_consumer(js: JetStreamContext, stage: str, topology: Topology) -> ConsumerSpec:
    """Create or update the stage's durable consumer (the server's create
    request is create-or-update, so concurrent workers agree)."""
    spec = consumer_spec(stage)
    await js.add_consumer(spec.stream, topology.consumer_config(spec))
    return spec


async def ensure_topology(
    js: JetStreamContext, topology: Topology, stages: tuple[str, ...] | None = None
) -> None:
    """Every stream, and the consumers of ``stages`` (all stages if None)."""
    await ensure_streams(js, topology)
    for stage in stages if stages is not None else tuple(CONSUMERS):
        await ensure_consumer(js, stage, topology)
