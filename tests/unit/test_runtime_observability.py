"""Structured logs carry the journey; metrics live in the worker's own registry;
the handler context queues what it emits and refuses what cannot be sent."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
import uuid

import pytest

from esper.bus import events as ev
from esper.errors import MalformedEvent
from esper.infra.ports import free_port
from esper.workers.handler import HandlerContext, batch_capable
from esper.workers.logging import JsonFormatter, configure_logging, log_context
from esper.workers.metrics import WorkerMetrics
from esper.workers.passthrough import compile_handler, passthrough_cache_key


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    yield stream
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_esper_json", False):
            root.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_lines_are_json_and_carry_the_context(captured: io.StringIO) -> None:
    log = logging.getLogger("esper.test")
    with log_context(stage="compile", correlation_id="journey-1"):
        with log_context(event_id="e1"):
            log.info("handling %s", "it", extra={"attempt": 2})
        log.warning("after")
    log.info("outside")
    first, second, third = lines(captured)
    assert first["msg"] == "handling it" and first["level"] == "info"
    assert (first["stage"], first["correlation_id"], first["event_id"]) == (
        "compile", "journey-1", "e1",
    )
    assert first["attempt"] == 2
    assert second["correlation_id"] == "journey-1" and "event_id" not in second
    assert "correlation_id" not in third
    assert str(first["ts"]).endswith("+00:00")


def test_exceptions_are_logged_whole() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, "f", 1, "failed", None, None)
        import sys

        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert "RuntimeError: boom" in str(out["exc"])


def test_metrics_are_per_worker_and_served_over_http() -> None:
    a, b = WorkerMetrics("compile"), WorkerMetrics("compile")
    a.processed(3)
    a.failed("retry")
    a.dead_lettered()
    a.observe_latency(0.004)
    a.set_lag(17, 2)
    assert a.value("esper_worker_processed_total") == 3
    assert a.value("esper_worker_failed_total", kind="retry") == 1
    assert a.value("esper_worker_consumer_lag") == 17
    assert a.value("esper_worker_handler_seconds_count") == 1
    assert b.value("esper_worker_processed_total") == 0  # separate registries
    port = free_port()
    a.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    assert 'esper_worker_processed_total{stage="compile"} 3.0' in body
    assert 'esper_worker_dead_lettered_total{stage="compile"} 1.0' in body


def test_context_emits_encoded_events_and_refuses_oversized_ones() -> None:
    ctx: HandlerContext[ev.EsperEvent] = HandlerContext(None, [], "deploy", 1)  # type: ignore[arg-type]
    ok = ev.KernelRetired(correlation_id="j", kernel_id=uuid.uuid4(), cache_key="k", reason="r")
    ctx.emit(ok)
    assert ctx.emitted == [ok] and ctx.payloads == [ev.encode(ok)]
    huge = ok.model_copy(update={"reason": "r" * ev.MAX_EVENT_BYTES})
    with pytest.raises(MalformedEvent):
        ctx.emit(huge)
    assert ctx.emitted == [ok]


def test_pass_through_handlers_take_batches_and_keys_are_stable() -> None:
    handler = compile_handler(("cpu", "cuda:90"))
    assert batch_capable(handler) and handler.batch > 1
    key = passthrough_cache_key("a" * 64, "cpu", "float32")
    assert key == passthrough_cache_key("a" * 64, "cpu", "float32")
    assert key != passthrough_cache_key("a" * 64, "cpu", "bfloat16")
    assert len(key) == 64
