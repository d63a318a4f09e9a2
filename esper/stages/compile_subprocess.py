"""Compile in a child process, so that a compiler crash, hang or leak takes down
only the child: ``python -m esper.stages.compile_subprocess``.

Protocol (JSON, never pickle): the parent writes one ``CompileRequest`` on stdin;
the child compiles, writes the signed packed artifact to ``request.output`` and
prints one ``CompileReply`` line on stdout (exit 0), or a ``{"error": ...}`` line
(exit 3) for a compile error. Any other exit — a traceback (1), a signal — is a
crash; the parent kills the child's process group when it overruns its timeout.

Test faults: ``options.extra["_test_fault"] = {blueprint name: "crash"|"hang"}``
(``"*"``: any name) makes the child die of SIGSEGV or hang on purpose for those
blueprints, but only when its environment has ``ESPER_TEST_FAULTS=1``; otherwise
the option is refused as a compile error. It is part of the cache key, so a key
built with faults armed never shadows a real one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TEST_FAULTS_ENV = "ESPER_TEST_FAULTS"
EXIT_COMPILE_ERROR = 3
_STDERR_TAIL = 2000


class CompileRequest(BaseModel):
    """What the child compiles. ``ir`` is the (optimised) blueprint as JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ir: dict[str, Any]
    target: str
    dtype: str
    backend: str
    options: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] | None = None
    signing_key: str
    output: str
    parent_pid: int | None = None


class CompileReply(BaseModel):
    """The child's result line; the artifact bytes are in the request's output file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_key: str
    digest: str
    size: int
    backend: str
    timings: dict[str, float] = Field(default_factory=dict)


# -- the child ------------------------------------------------------------------------


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: the kernel SIGKILLs us when the worker dies (no orphan compiles)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect


def _test_fault(options: dict[str, Any], name: str) -> None:
    faults = (options.get("extra") or {}).get("_test_fault")
    if faults is None:
        return
    from esper.errors import CompileError

    if os.environ.get(TEST_FAULTS_ENV) != "1":
        raise CompileError(f"test faults {faults!r} refused: {TEST_FAULTS_ENV}=1 is not set")
    if not isinstance(faults, dict):
        raise CompileError(f"_test_fault must map blueprint names to faults, got {faults!r}")
    fault = faults.get(name, faults.get("*"))
    if fault is None:
        return
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif fault == "hang":
        while True:
            time.sleep(3600)
    raise CompileError(f"unknown test fault {fault!r}")


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _parent_from_argv(argv: list[str]) -> int | None:
    if len(argv) >= 2 and argv[0] == "--parent-pid":
        return int(argv[1])
    return None


def child_main(argv: list[str] | None = None) -> int:
    """Import the compiler, then read one request, compile it, answer. Exit 0 on
    success, 3 on a compile error. The imports come first so that a child started
    ahead of time (a warm spare) is ready the moment a request arrives."""
    parent = _parent_from_argv(sys.argv[1:] if argv is None else argv)
    _die_with_parent(parent)

    from esper.artifacts.signing import load_private_key
    from esper.compile.backend import CompileOptions
    from esper.compile.pipeline import compile_blueprint
    from esper.errors import EsperError
    from esper.ir import BlueprintIR
    from esper.stages.targets import choose_backend

    try:
        request = CompileRequest.model_validate_json(sys.stdin.buffer.read())
    except ValidationError as exc:
        _answer({"error": f"bad compile request: {exc}"})
        return EXIT_COMPILE_ERROR
    if parent is None:
        _die_with_parent(request.parent_pid)

    try:
        _test_fault(request.options, str(request.ir.get("name", "")))
        ir = BlueprintIR.from_dict(request.ir)
        if request.backend != "torch":
            choose_backend(request.target)  # imports a self-registering backend
        result = compile_blueprint(
            ir,
            target=request.target,
            dtype=request.dtype,
            backend=request.backend,
            options=CompileOptions(**request.options),
            private_key=load_private_key(Path(request.signing_key)),
            versions=request.versions,
        )
    except (EsperError, ValueError) as exc:
        _answer({"error": f"{type(exc).__name__}: {exc}"})
        return EXIT_COMPILE_ERROR
    Path(request.output).write_bytes(result.packed)
    reply = CompileReply(
        cache_key=result.cache_key,
        digest=result.digest,
        size=len(result.packed),
        backend=result.manifest.backend,
        timings=result.timings,
    )
    _answer(reply.model_dump())
    return 0


# -- the parent -----------------------------------------------------------------------


@dataclass(frozen=True)
class CompileOutcome:
    """How a child compile ended: ``reply`` + ``packed`` on success, else ``error``
    (a message fit for a rejection). ``wall_s`` includes the child's start-up."""

    reply: CompileReply | None
    packed: bytes | None
    error: str | None
    wall_s: float
    returncode: int | None

    @property
    def ok(self) -> bool:
        return self.reply is not None and self.packed is not None


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text[-_STDERR_TAIL:]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session


def _judge(returncode: int, out: bytes, err: bytes, output: Path) -> tuple[Any, Any, Any]:
    lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln.strip()]
    answer: dict[str, Any] = {}
    if lines:
        with contextlib.suppress(json.JSONDecodeError):
            answer = json.loads(lines[-1])
    if returncode < 0:
        return None, None, f"compiler crashed: killed by {_signal_name(returncode)}" + (
            f"; stderr: {_tail(err)}" if err.strip() else ""
        )
    if returncode != 0:
        if isinstance(answer, dict) and "error" in answer:
            return None, None, f"compile failed: {answer['error']}"
        return None, None, f"compiler crashed: exit code {returncode}; stderr: {_tail(err)}"
    try:
        reply = CompileReply.model_validate(answer)
        packed = output.read_bytes()
    except (ValidationError, OSError) as exc:
        return None, None, f"compiler gave no usable result: {exc}; stdout: {_tail(out)}"
    if len(packed) != reply.size:
        return None, None, f"artifact file holds {len(packed)} bytes, reply says {reply.size}"
    return reply, packed, None


async def spawn_child(python: str = sys.executable) -> asyncio.subprocess.Process:
    """A compiler child in its own session; it imports the compiler, then waits
    for its request on stdin."""
    return await asyncio.create_subprocess_exec(
        python, "-m", "esper.stages.compile_subprocess", "--parent-pid", str(os.getpid()),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


class WarmChildren:
    """Children started ahead of time, so a compile skips Python and torch
    start-up (seconds) — each is used once, and a new one is started as it is
    taken. Children die with this process (PR_SET_PDEATHSIG) or on ``close``."""

    def __init__(self, size: int = 1, python: str = sys.executable) -> None:
        self.size = size
        self.python = python
        self._ready: list[asyncio.Task[asyncio.subprocess.Process]] = []

    def prime(self) -> None:
        """Start the spares now (needs a running event loop)."""
        self._top_up()

    def _top_up(self) -> None:
        while len(self._ready) < self.size:
            self._ready.append(asyncio.ensure_future(spawn_child(self.python)))

    async def take(self) -> asyncio.subprocess.Process:
        while self._ready:
            proc = await self._ready.pop(0)
            self._top_up()
            if proc.returncode is None:
                return proc
        self._top_up()
        return await spawn_child(self.python)

    async def close(self) -> None:
        ready, self._ready = self._ready, []
        for task in ready:
            with contextlib.suppress(BaseException):
                proc = await task
                _kill_group(proc)
                await proc.wait()


async def run_compile(
    request: CompileRequest,
    *,
    timeout: float,
    tick: float = 2.0,
    on_tick: Callable[[], Awaitable[None]] | None = None,
    python: str = sys.executable,
    spares: WarmChildren | None = None,
) -> CompileOutcome:
    """Run one compile in a child process (a warm one from ``spares`` if given);
    ``on_tick`` runs every ``tick`` seconds while it works (heartbeats). A child
    past ``timeout`` is killed, its whole process group with it; so is the child
    of a cancelled caller. ``wall_s`` excludes a warm child's start-up."""
    output = Path(request.output)
    payload = request.model_copy(update={"parent_pid": os.getpid()}).model_dump_json().encode()
    started = time.perf_counter()
    proc = await (spares.take() if spares is not None else spawn_child(python))
    talk = asyncio.ensure_future(proc.communicate(payload))
    try:
        deadline = started + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                _kill_group(proc)
                await talk
                return CompileOutcome(None, None, f"compiler timed out after {timeout:g} s",
                                      time.perf_counter() - started, proc.returncode)
            done, _ = await asyncio.wait({talk}, timeout=min(tick, remaining))
            if done:
                break
            if on_tick is not None:
                await on_tick()
        out, err = talk.result()
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            talk.cancel()
            with contextlib.suppress(BaseException):
                await proc.wait()
    wall = time.perf_counter() - started
    assert proc.returncode is not None
    reply, packed, error = _judge(proc.returncode, out, err, output)
    return CompileOutcome(reply, packed, error, wall, proc.returncode)


if __name__ == "__main__":
    raise SystemExit(child_main())
