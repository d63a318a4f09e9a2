"""Run the checks for one artifact in an isolated subprocess
(``python -m esper.validate.sandbox``) with a wall-clock timeout and crash
detection. JSON in (stdin), JSON out (stdout), artifact bytes in a private temp
file; never pickle. A killed or crashed sandbox becomes a failed check —
``timeout`` or ``crash`` — naming the check that was running.

One sandbox process per validation (nothing leaks from one kernel to the
next); ``spares`` processes are started ahead and wait, torch imported, for
their request, so a validation does not pay for process start (a spare is
started when a validation ends, so it never competes with one for the CPU)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from esper.errors import EsperError
from esper.validate import report as r
from esper.validate.policy import ValidationPolicy
from esper.validate.protocol import PROGRESS_PREFIX, ExpectedKernel, SandboxRequest

log = logging.getLogger(__name__)

Heartbeat = Callable[[], Awaitable[None]]
_TAIL_LINES = 40
_HEARTBEAT_EVERY_S = 5.0


class SandboxError(EsperError, RuntimeError):
    """The sandbox could not be started or answered nonsense without crashing:
    a fault of this machine, not of the kernel (the stage retries)."""


@dataclass(eq=False)
class _Sandbox:
    proc: asyncio.subprocess.Process
    spawned: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    check: str | None = None
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if line.startswith(PROGRESS_PREFIX):
                event, _, name = line[len(PROGRESS_PREFIX):].strip().partition(" ")
                if event == "ready":
                    self.ready.set()
                elif event == "check":
                    self.check = name
            else:
                self.tail.append(line[:500])

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the kernel's children too

    def during(self) -> str:
        return f" during check {self.check!r}" if self.check else " before any check"

    def tail_text(self, lines: int = 12) -> str:
        return "\n".join(list(self.tail)[-lines:])


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


class SandboxRunner:
    """Validates artifacts in sandbox processes; one runner per worker process."""

    def __init__(self, *, python: str = sys.executable, spares: int = 1,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.python = python
        self.spares = spares
        self.env = dict(os.environ if env is None else env)
        self.cwd = None if cwd is None else str(cwd)
        self._idle: list[_Sandbox] = []
        self._closed = False

    async def _spawn(self) -> _Sandbox:
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "esper.validate.sandbox",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env, cwd=self.cwd,
            start_new_session=True,  # its own process group: killpg reaches everything
        )
        sb = _Sandbox(proc, time.monotonic())
        sb.reader = asyncio.create_task(sb.read_stderr(), name=f"sandbox-{proc.pid}-stderr")
        return sb

    async def warm(self) -> None:
        """Start spares now (e.g. when the worker starts), not at the first kernel."""
        while len(self._idle) < self.spares and not self._closed:
            self._idle.append(await self._spawn())

    async def wait_ready(self, timeout: float = 300.0) -> None:
        """Start the spares and wait until the next one to be used has imported
        torch (benchmarks use it to time validations without process start)."""
        await self.warm()
        if self._idle:
            await self._until_ready(self._idle[0], timeout, None)

    async def _take(self) -> _Sandbox:
        while self._idle:
            sb = self._idle.pop(0)
            if sb.alive:
                return sb
            await self._reap(sb)
        return await self._spawn()

    async def _reap(self, sb: _Sandbox) -> None:
        sb.kill()
        with contextlib.suppress(Exception):
            await sb.proc.wait()
        if sb.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sb.reader, 5)

    async def aclose(self) -> None:
        """Kill the idle spares."""
        self._closed = True
        idle, self._idle = self._idle, []
        for sb in idle:
            await self._reap(sb)

    async def validate(
        self,
        packed: bytes,
        *,
        expected: ExpectedKernel,
        blueprint: dict[str, Any],
        public_key_pem: str,
        policy: ValidationPolicy,
        device: str = "auto",
        heartbeat: Heartbeat | None = None,
    ) -> r.ValidationReport:
        """The sandbox's report; a timeout or crash is a failed ``timeout``/``crash``
        check. Raises SandboxError when the sandbox never became ready."""
        t0 = time.monotonic()
        sb = await self._take()
        try:
            with tempfile.TemporaryDirectory(prefix="esper-validate-") as tmp:
                path = Path(tmp) / "artifact"
                path.write_bytes(packed)
                request = SandboxRequest(artifact_path=str(path), public_key_pem=public_key_pem,
                                         expected=expected, blueprint=blueprint, policy=policy,
                                         device=device)  # type: ignore[arg-type]
                waited = await self._until_ready(sb, policy.start_timeout_s, heartbeat)
                t_sent = time.monotonic()
                report = await self._exchange(sb, request, policy.timeout_s, heartbeat)
                done = time.monotonic()
        finally:
            await self._reap(sb)
            if not self._closed:
                # The next validation's sandbox starts now, not during this one: its
                # torch import would compete with the checks (and skew timings).
                await self.warm()
        return report.with_timings(start_s=waited, exchange_s=done - t_sent, total_s=done - t0)

    async def _until_ready(self, sb: _Sandbox, timeout: float, heartbeat: Heartbeat | None
                           ) -> float:
        t0 = time.monotonic()
        while not sb.ready.is_set():
            if not sb.alive and sb.proc.returncode is not None:
                await asyncio.sleep(0.05)  # let the reader drain the last lines
                raise SandboxError(f"sandbox exited ({sb.proc.returncode}) while starting:\n"
                                   f"{sb.tail_text()}")
            if time.monotonic() - t0 > timeout:
                raise SandboxError(f"sandbox not ready after {timeout:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sb.ready.wait(), min(_HEARTBEAT_EVERY_S, timeout))
            if heartbeat is not None:
                await heartbeat()
        return time.monotonic() - t0

    async def _exchange(self, sb: _Sandbox, request: SandboxRequest, timeout: float,
                        heartbeat: Heartbeat | None) -> r.ValidationReport:
        assert sb.proc.stdin is not None and sb.proc.stdout is not None
        answer = asyncio.create_task(sb.proc.stdout.read())
        try:
            sb.proc.stdin.write(request.model_dump_json().encode())
            await sb.proc.stdin.drain()
            sb.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died already; the return code says how
        deadline = time.monotonic() + timeout
        while sb.alive:
            left = deadline - time.monotonic()
            if left <= 0:
                sb.kill()
                await sb.proc.wait()
                answer.cancel()
                return r.ValidationReport(device="unknown", checks=[r.failed(
                    r.TIMEOUT, f"killed after {timeout:.0f}s{sb.during()}", figure=timeout,
                    bound=timeout, check_running=sb.check)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sb.proc.wait(), min(left, _HEARTBEAT_EVERY_S))
            if heartbeat is not None:
                await heartbeat()
        out = await answer
        if sb.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sb.reader, 5)
        rc = sb.proc.returncode
        assert rc is not None
        if rc != 0:
            how = f"killed by {_signal_name(rc)}" if rc < 0 else f"exited with status {rc}"
            return r.ValidationReport(device="unknown", checks=[r.failed(
                r.CRASH, f"sandbox {how}{sb.during()}", figure=rc, check_running=sb.check,
                stderr_tail=sb.tail_text())])
        try:
            return r.ValidationReport.model_validate_json(out)
        except ValidationError:
            # Exit status 0 and no report: something (the kernel?) ended the process.
            return r.ValidationReport(device="unknown", checks=[r.failed(
                r.CRASH, f"sandbox exited without a report{sb.during()}", figure=0,
                check_running=sb.check, stderr_tail=sb.tail_text())])
