"""The runtime's decisions that need no server: what a failure means, how long
to wait before a retry, what the streams and consumers look like."""

from __future__ import annotations

import nats.errors
import pytest
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from esper.bus.events import TensorSpec
from esper.bus.topology import (
    CONSUMERS,
    STREAMS,
    DeliveryPolicy,
    Topology,
    consumer_spec,
)
from esper.errors import ConfigError, IRValidationError, MalformedEvent, Reject, Retry
from esper.workers.failures import Verdict, classify, describe, is_database_outage, is_transient


class _Orig(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _dbapi(sqlstate: str) -> DBAPIError:
    return DBAPIError("SELECT 1", {}, _Orig(sqlstate))


@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (Reject("never"), Verdict.REJECT),
        (MalformedEvent("s", "p"), Verdict.REJECT),
        (IRValidationError("node x: bad"), Verdict.REJECT),
        (ValueError("bad value"), Verdict.REJECT),
        (Retry("later", delay=3), Verdict.RETRY),
        (OperationalError("x", {}, _Orig("08006")), Verdict.RETRY),
        (_dbapi("40P01"), Verdict.RETRY),  # deadlock
        (_dbapi("57P01"), Verdict.RETRY),  # admin shutdown
        (IntegrityError("x", {}, _Orig("23505")), Verdict.RETRY),  # a bug or a race: retried
        (ConnectionRefusedError(), Verdict.RETRY),
        (TimeoutError(), Verdict.RETRY),
        (nats.errors.TimeoutError(), Verdict.RETRY),
        (RuntimeError("unknown"), Verdict.RETRY),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.value,
)
def test_classify(exc: BaseException, verdict: Verdict) -> None:
    assert classify(exc) is verdict


def test_pydantic_validation_errors_are_permanent() -> None:
    with pytest.raises(ValidationError) as caught:
        TensorSpec(shape=(1,), dtype="float64")  # type: ignore[arg-type]
    assert classify(caught.value) is Verdict.REJECT


def test_database_outage_is_narrower_than_transient() -> None:
    assert is_database_outage(OperationalError("x", {}, _Orig("08006")))
    assert is_database_outage(ConnectionRefusedError())
    assert not is_database_outage(TimeoutError())  # a slow handler, not Postgres
    assert not is_database_outage(Retry("x"))
    assert is_transient(Retry("x")) and is_transient(TimeoutError())
    assert not is_database_outage(IntegrityError("x", {}, _Orig("23505")))


def test_describe_keeps_reject_reasons_verbatim_and_names_other_types() -> None:
    assert describe(Reject("kernel too slow")) == "kernel too slow"
    assert describe(RuntimeError("boom")) == "RuntimeError: boom"
    assert describe(KeyError()) == "KeyError: KeyError()"
    assert len(describe(RuntimeError("x" * 10_000))) == 4000


def test_nak_delays_grow_and_then_stay() -> None:
    p = DeliveryPolicy(nak_delays=(0.5, 2.0, 5.0))
    assert [p.nak_delay(n) for n in (0, 1, 2, 3, 4, 99)] == [0.5, 0.5, 2.0, 5.0, 5.0, 5.0]


def test_a_policy_needs_room_for_a_retry() -> None:
    with pytest.raises(ConfigError):
        DeliveryPolicy(max_deliver=1)


def test_each_stage_has_a_durable_consumer_on_its_event() -> None:
    assert {s: (c.stream, c.filter_subject) for s, c in CONSUMERS.items()} == {
        "compile": ("ESPER_BLUEPRINTS", "esper.blueprint.submitted"),
        "validate": ("ESPER_KERNELS", "esper.kernel.compiled"),
        "deploy": ("ESPER_KERNELS", "esper.kernel.validated"),
    }
    assert consumer_spec("deploy").event_type.__name__ == "KernelValidated"
    with pytest.raises(ConfigError, match="unknown stage"):
        consumer_spec("train")


def test_stream_and_consumer_configs_are_explicit() -> None:
    topo = Topology(replicas=3, duplicate_window=120, policy=DeliveryPolicy(ack_wait=10))
    kernels = next(s for s in STREAMS if s.name == "ESPER_KERNELS")
    cfg = topo.stream_config(kernels)
    assert cfg.subjects == ["esper.kernel.>"]
    assert cfg.num_replicas == 3 and cfg.duplicate_window == 120
    assert cfg.max_age == 30 * 86_400  # kernel.ready history for late trainers
    assert cfg.storage is not None and cfg.storage.value == "file"
    consumer = topo.consumer_config(CONSUMERS["validate"])
    assert consumer.durable_name == "validate"
    assert consumer.ack_wait == 10 and consumer.max_deliver == 5
    assert consumer.backoff is None  # it would override our nak delays (see DeliveryPolicy)
    assert consumer.max_ack_pending == 2000
    assert consumer.ack_policy is not None and consumer.ack_policy.value == "explicit"
