"""Runs stage workers as child processes and restarts any that dies, with a
backoff; ``stop()`` sends SIGTERM (workers finish in-flight work and drain)
and SIGKILLs what has not exited after a grace period."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def parse_workers(spec: str | None, stages: tuple[str, ...]) -> dict[str, int]:
    """``"compile=2,validate=1"`` → counts per stage; stages not named get 1."""
    counts = dict.fromkeys(stages, 1)
    if not spec:
        return counts
    for part in spec.split(","):
        name, sep, num = part.partition("=")
        name = name.strip()
        if name not in counts or not sep or not num.strip().isdigit():
            raise ValueError(
                f"bad --workers entry {part!r}: expected STAGE=N with STAGE in {', '.join(stages)}"
            )
        counts[name] = int(num)
    return counts


@dataclass
class _Child:
    stage: str
    index: int
    proc: subprocess.Popen[bytes]
    started_at: float
    restarts: int = 0


@dataclass
class Supervisor:
    """One process per (stage, index); ``env`` is added to each child's environment."""

    counts: dict[str, int]
    env: dict[str, str]
    grace: float = 30.0
    children: list[_Child] = field(default_factory=list)
    args: tuple[str, ...] = ()  # added to every worker's run_stage command line

    def _spawn(self, stage: str, index: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "esper.workers.run_stage", stage, *self.args]
        return subprocess.Popen(cmd, env={**os.environ, **self.env})

    def start(self) -> None:
        for stage, n in self.counts.items():
            for i in range(n):
                self.children.append(_Child(stage, i, self._spawn(stage, i), time.monotonic()))

    def poll(self) -> list[str]:
        """Restart children that exited; returns a line per restart."""
        notes = []
        for child in self.children:
            code = child.proc.poll()
            if code is None:
                continue
            # Back off when a worker keeps dying right after start (bad config).
            if time.monotonic() - child.started_at < 5 and child.restarts >= 3:
                continue
            child.restarts += 1
            notes.append(f"worker {child.stage}#{child.index} exited with {code}; restarting")
            child.proc = self._spawn(child.stage, child.index)
            child.started_at = time.monotonic()
        return notes

    def stop(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + self.grace
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
