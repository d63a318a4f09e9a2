"""Prometheus metrics of one worker, in its own registry (several workers may
share a process, e.g. in tests or a single-process `esper up`), served with a
``/healthz`` for container probes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    """Counters and gauges a stage's worker exports, labelled by stage.

    Health: the lag probe reads the stage's consumer from JetStream every few
    seconds; ``healthy()`` is true while its last success is under
    ``health_max_age`` seconds old (a hung loop or a lost bus turns it false)."""

    health_max_age = 30.0

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._last_seen: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._processed = Counter(
            "esper_worker_processed", "Messages handled and committed", ["stage"], registry=r
        )
        self._transactions = Counter(
            "esper_worker_transactions", "Transactions committed (messages share one per group)",
            ["stage"], registry=r,
        )
        self._duplicates = Counter(
            "esper_worker_duplicates", "Redeliveries skipped by the inbox", ["stage"], registry=r
        )
        self._failed = Counter(
            "esper_worker_failed", "Handler or transaction failures", ["stage", "kind"], registry=r
        )
        self._dead = Counter(
            "esper_worker_dead_lettered", "Messages dead-lettered", ["stage"], registry=r
        )
        self._latency = Histogram(
            "esper_worker_handler_seconds",
            "Handler latency",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._lag = Gauge(
            "esper_worker_consumer_lag", "Messages not yet delivered (num_pending)", ["stage"],
            registry=r,
        )
        self._ack_pending = Gauge(
            "esper_worker_ack_pending", "Delivered, not yet acked", ["stage"], registry=r
        )
        self._published = Counter(
            "esper_outbox_published", "Outbox rows published by this worker's relay", ["stage"],
            registry=r,
        )
        self._dup_published = Counter(
            "esper_outbox_duplicate_publishes",
            "Outbox rows JetStream had already (re-published after a relay died)",
            ["stage"],
            registry=r,
        )

    def processed(self, n: int = 1) -> None:
        self._processed.labels(self.stage).inc(n)

    def transaction(self) -> None:
        self._transactions.labels(self.stage).inc()

    def duplicate(self, n: int = 1) -> None:
        self._duplicates.labels(self.stage).inc(n)

    def failed(self, kind: str) -> None:
        self._failed.labels(self.stage, kind).inc()

    def dead_lettered(self) -> None:
        self._dead.labels(self.stage).inc()

    def observe_latency(self, seconds: float) -> None:
        self._latency.labels(self.stage).observe(seconds)

    def set_lag(self, pending: int, ack_pending: int) -> None:
        self._last_seen = time.monotonic()
        self._lag.labels(self.stage).set(pending)
        self._ack_pending.labels(self.stage).set(ack_pending)

    def published(self, n: int) -> None:
        self._published.labels(self.stage).inc(n)

    def duplicate_publishes(self, n: int) -> None:
        self._dup_published.labels(self.stage).inc(n)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (tests, health output); 0 if never set."""
        found = self.registry.get_sample_value(name, {"stage": self.stage, **labels})
        return found or 0.0

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """(ok, detail): ok while JetStream answered the lag probe recently."""
        age = None if self._last_seen is None else time.monotonic() - self._last_seen
        ok = age is not None and age < self.health_max_age
        return ok, {"stage": self.stage, "ok": ok,
                    "jetstream_seen_s_ago": None if age is None else round(age, 1)}

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` and ``/healthz`` (200 or 503, JSON) over HTTP on
        ``port`` (daemon threads)."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return metrics(environ, start_response)  # type: ignore[no-any-return]
            ok, detail = self.healthy()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps(detail).encode()]

        server = make_server(addr, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass
