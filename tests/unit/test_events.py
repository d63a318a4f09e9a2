"""Wire events: frozen, strict, round-trip through JSON, decode failures name
the subject and the problem."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from esper.bus import events as ev
from esper.errors import EsperError, MalformedEvent

H = "ab" * 32


def samples() -> list[ev.EsperEvent]:
    kernel = {
        "kernel_id": uuid.uuid4(), "cache_key": "k" * 64, "blueprint_hash": H,
        "target": "cuda:90", "dtype": "bfloat16", "backend": "triton",
    }
    return [
        ev.BlueprintSubmitted(correlation_id="j1", blueprint_hash=H, name="mlp",
                              ir={"nodes": []}, dtypes=("float32", "bfloat16"),
                              submitted_by="me"),
        ev.KernelCompiled(correlation_id="j1", **kernel, artifact_digest="d" * 64,
                          cache_hit=True, compile_ms=812.5),
        ev.KernelValidated(correlation_id="j1", **kernel, device="H100",
                           checks=[ev.CheckResult(check="max_abs_err", passed=True,
                                                  figure=1e-3, bound=1e-2)]),
        ev.KernelRejected(correlation_id="j1", blueprint_hash=H, stage="validate",
                          reasons=[ev.RejectReason(check="nan", message="NaN in grad",
                                                   figure=1.0, bound=0.0)]),
        ev.KernelReady(correlation_id="j1", **kernel,
                       input_schemas=[ev.TensorSpec(shape=("B", 64), dtype="bfloat16")],
                       output_schemas=[ev.TensorSpec(shape=("B", 64), dtype="bfloat16")],
                       artifact_location="obj://esper/" + "d" * 64),
        ev.KernelRetired(correlation_id="j1", kernel_id=uuid.uuid4(), cache_key="k",
                         reason="superseded"),
        ev.SeedEventMsg(correlation_id="run-7", run_id="run-7", site="block3", seed=2,
                        event="germinated", from_state="DORMANT", to_state="GERMINATED",
                        step=1200, kernel_cache_key="k" * 64, detail={"alpha": 0.0}),
        ev.DeadLettered(correlation_id="j1", stage="compile",
                        subject_of_message=ev.BLUEPRINT_SUBMITTED, reason="bad",
                        delivery_count=1, stream_seq=9, payload_size=3,
                        payload_excerpt="abc"),
    ]


@pytest.mark.parametrize("event", samples(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_json_on_its_subject(event: ev.EsperEvent) -> None:
    data = ev.encode(event)
    assert json.loads(data)["event_id"] == str(event.event_id)
    assert ev.decode(event.subject, data) == event


def test_subjects_are_the_documented_ones() -> None:
    by_type = {type(e).__name__: e.subject for e in samples()}
    assert by_type == {
        "BlueprintSubmitted": "esper.blueprint.submitted",
        "KernelCompiled": "esper.kernel.compiled",
        "KernelValidated": "esper.kernel.validated",
        "KernelRejected": "esper.kernel.rejected",
        "KernelReady": "esper.kernel.ready",
        "KernelRetired": "esper.kernel.retired",
        "SeedEventMsg": "esper.seed.germinated",
        "DeadLettered": "esper.dlq.compile",
    }


def test_events_are_frozen_strict_and_stamped() -> None:
    e = samples()[0]
    with pytest.raises(ValidationError):
        e.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs"):
        ev.KernelRetired(correlation_id="x", kernel_id=uuid.uuid4(), cache_key="k",
                         reason="r", colour="red")  # type: ignore[call-arg]
    assert e.schema_version == ev.SCHEMA_VERSION
    assert e.occurred_at.tzinfo is not None
    assert abs((datetime.now(UTC) - e.occurred_at).total_seconds()) < 60
    assert samples()[0].event_id != samples()[0].event_id  # fresh uuid4 each time


def test_field_rules_are_enforced() -> None:
    with pytest.raises(ValidationError):
        ev.BlueprintSubmitted(correlation_id="j", blueprint_hash="nothex", name="x", ir={})
    with pytest.raises(ValidationError):
        ev.BlueprintSubmitted(correlation_id="j", blueprint_hash=H, name="x", ir={},
                              dtypes=("float64",))  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ev.KernelRejected(correlation_id="j", blueprint_hash=H, stage="validate", reasons=[])
    with pytest.raises(ValidationError):
        ev.BlueprintSubmitted(correlation_id="", blueprint_hash=H, name="x", ir={})


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\xff\xfe\x00 not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema_version": 1, "correlation_id": "x"}', "blueprint_hash: Field required"),
        (b'{"schema_version": 1, "correlation_id": "x", "blueprint_hash": "' + H.encode()
         + b'", "name": "n", "ir": {}, "colour": 1}', "colour: Extra inputs"),
        (b"{" + b" " * ev.MAX_EVENT_BYTES + b"}", "byte limit"),
    ],
)
def test_decode_names_subject_and_problem(data: bytes, problem: str) -> None:
    with pytest.raises(MalformedEvent) as caught:
        ev.decode(ev.BLUEPRINT_SUBMITTED, data)
    message = str(caught.value)
    assert ev.BLUEPRINT_SUBMITTED in message and problem in message
    assert isinstance(caught.value, EsperError) and isinstance(caught.value, ValueError)
    assert caught.value.subject == ev.BLUEPRINT_SUBMITTED


def test_decode_refuses_other_schema_versions_and_wrong_subjects() -> None:
    e = samples()[0]
    raw = json.loads(ev.encode(e))
    raw["schema_version"] = 2
    with pytest.raises(MalformedEvent, match="schema_version 2"):
        ev.decode(e.subject, json.dumps(raw).encode())
    with pytest.raises(MalformedEvent, match="no event type"):
        ev.decode("esper.nothing.here", ev.encode(e))
    seed = samples()[6]
    with pytest.raises(MalformedEvent, match=r"belongs on esper\.seed\.germinated"):
        ev.decode("esper.seed.culled", ev.encode(seed))


def test_encode_refuses_oversized_events() -> None:
    big = ev.BlueprintSubmitted(correlation_id="j", blueprint_hash=H, name="x",
                                ir={"pad": "x" * ev.MAX_EVENT_BYTES})
    with pytest.raises(MalformedEvent, match="over the"):
        ev.encode(big)


def test_peek_ids_reads_what_it_can() -> None:
    e = samples()[0]
    assert ev.peek_ids(ev.encode(e)) == (str(e.event_id), "j1")
    assert ev.peek_ids(b"garbage") == (None, None)
    assert ev.peek_ids(b'{"event_id": 5, "correlation_id": "c"}') == (None, "c")
