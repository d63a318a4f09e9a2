"""Child processes of embedded servers: stop them gracefully, or kill them and
their children outright (fault-injection tests do the latter)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import psutil


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGKILL at once (no chance to flush anything) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    return proc.wait()


def kill_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL a process and all its descendants, and wait until they are gone.

    Waiting matters for PostgreSQL: a new postmaster refuses to start while
    orphaned backends still hold the old shared memory."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    wait_gone(procs, timeout)


def _gone(proc: psutil.Process) -> bool:
    # A zombie is dead; whether it gets reaped depends on who its parent is.
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until every process has exited (or is a zombie)."""
    deadline = time.monotonic() + timeout
    while not all(_gone(p) for p in procs):
        if time.monotonic() > deadline:
            alive = [p.pid for p in procs if not _gone(p)]
            raise TimeoutError(f"processes {alive} still alive after {timeout:.1f}s")
        time.sleep(0.01)
