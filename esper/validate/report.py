"""The machine-readable validation report: one record per check (status,
figure, bound, message, details), the verdict, the device and the timings. It is
what the sandbox answers, what the ``validations`` row stores, and what the
stage turns into ``CheckResult``s / ``RejectReason``s on the wire."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from esper.bus.events import CheckResult, RejectReason

Status = Literal["passed", "failed", "skipped"]

# Check names (the ``check`` of every CheckResult / RejectReason).
INTEGRITY = "integrity"
FORWARD = "forward"
BACKWARD = "backward"
FINITENESS = "finiteness"
DETERMINISM = "determinism"
GRAFT_SAFETY = "graft_safety"
PERFORMANCE = "performance"
RESOURCES = "resources"
COVERAGE = "coverage"
TIMEOUT = "timeout"
CRASH = "crash"
SANDBOX = "sandbox"

CPU_NUMERICS_NOTE = "numerics verified on CPU"


def finite_or_none(value: float | None) -> float | None:
    """JSON (and JSONB) carry no NaN/Inf: a non-finite figure becomes None and the
    check's message says why."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class CheckRecord(BaseModel):
    """One check's outcome with its evidence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    check: str
    status: Status
    figure: float | None = None
    bound: float | None = None
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    duration_ms: float | None = None

    @field_validator("figure", "bound", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> float | None:
        return finite_or_none(v)

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def result(self) -> CheckResult:
        return CheckResult(check=self.check, passed=not self.failed, figure=self.figure,
                           bound=self.bound, message=self.message or None)

    def reason(self) -> RejectReason:
        return RejectReason(check=self.check, message=self.message or self.status,
                            figure=self.figure, bound=self.bound)


def passed(check: str, message: str = "", *, figure: float | None = None,
           bound: float | None = None, **details: Any) -> CheckRecord:
    return CheckRecord(check=check, status="passed", figure=figure, bound=bound,
                       message=message, details=details)


def failed(check: str, message: str, *, figure: float | None = None,
           bound: float | None = None, **details: Any) -> CheckRecord:
    return CheckRecord(check=check, status="failed", figure=figure, bound=bound,
                       message=message, details=details)


def skipped(check: str, message: str, **details: Any) -> CheckRecord:
    return CheckRecord(check=check, status="skipped", message=message, details=details)


class ValidationReport(BaseModel):
    """Everything one validation found. ``passed`` iff no check failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field(max_length=64)
    checks: list[CheckRecord]
    notes: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds: ``checks_s`` (the sandbox's own work on the request; ``checks_cpu_s``
    its CPU time, all threads), ``start_s``
    (waiting for the sandbox to be ready; ~0 for a warm spare), ``exchange_s``
    (request sent to process exit), ``total_s``."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not any(c.failed for c in self.checks)

    def failures(self) -> list[CheckRecord]:
        return [c for c in self.checks if c.failed]

    def check_results(self) -> list[CheckResult]:
        return [c.result() for c in self.checks]

    def reasons(self) -> list[RejectReason]:
        return [c.reason() for c in self.failures()]

    def check(self, name: str) -> CheckRecord | None:
        """The record of check ``name`` (None if it did not run)."""
        return next((c for c in self.checks if c.check == name), None)

    def with_timings(self, **timings: float) -> ValidationReport:
        return self.model_copy(update={"timings": {**self.timings, **timings}})
