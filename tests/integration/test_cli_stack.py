"""`esper up`, `esper submit --wait` and `esper kernels` as a user runs them:
real processes, embedded NATS + PostgreSQL under a fresh ESPER_HOME."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from esper.ir import bundled_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
    env.update(ESPER_HOME=str(home), ESPER_TARGETS="cpu", PYTHONUNBUFFERED="1")
    return env


def _esper(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "esper", *args], env=_env(home), capture_output=True,
        text=True, timeout=timeout, check=False,
    )


class Stack:
    """One `esper up` process; ``stop()`` sends SIGTERM as Ctrl-C would."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.log = (home.parent / f"up-{time.monotonic_ns()}.log").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "esper", "up"], env=_env(home),
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "esper is up" not in self.output():
            assert self.proc.poll() is None, f"esper up exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"esper up not up in 60 s:\n{self.output()}"
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> list[psutil.Process]:
        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, self.output()
        return children


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "esper-home"


def _gone(procs: list[psutil.Process], timeout: float = 20) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_up_submit_wait_kernels_restart(home: Path, tmp_path: Path) -> None:
    stack = Stack(home)
    try:
        endpoints = json.loads((home / "endpoints.json").read_text())
        assert endpoints["database_url"].startswith("postgresql+asyncpg://")

        blueprint = str(bundled_path("residual_mlp"))
        first = _esper(home, "submit", "--wait", "--timeout", "120", blueprint)
        assert first.returncode == 0, first.stderr
        blueprint_hash = first.stdout.strip()
        assert len(blueprint_hash) == 64
        assert "ready" in first.stderr  # progress lines: compiled, validated, ready

        # A renamed, reordered equivalent is the same blueprint: no second compile.
        raw = json.loads(bundled_path("residual_mlp").read_text())
        rename = {n["id"]: f"{n['id']}_v2" for n in raw["nodes"]}
        for node in raw["nodes"]:
            node["id"] = rename[node["id"]]
            node["inputs"] = [rename.get(i, i) for i in node["inputs"]]
        raw["nodes"].reverse()
        raw["outputs"] = [rename[o] for o in raw["outputs"]]
        raw["name"] = "renamed"
        twin = tmp_path / "twin.json"
        twin.write_text(json.dumps(raw))
        second = _esper(home, "submit", "--wait", "--timeout", "120", str(twin))
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == blueprint_hash

        kernels = _esper(home, "kernels", "--json")
        rows = json.loads(kernels.stdout)
        assert [(r["blueprint_hash"], r["status"], r["backend"]) for r in rows] == [
            (blueprint_hash, "ready", "torch")
        ]
        stats = _esper(home, "kernels", "--stats")
        assert "hit ratio: 50.00% of 2 compile requests" in stats.stdout, stats.stdout

        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**raw, "nodes": raw["nodes"][:-1]}))
        invalid = _esper(home, "submit", str(bad))
        assert invalid.returncode == 2
        assert "node" in invalid.stderr
    finally:
        children = stack.stop()
    assert "stopping" in stack.output()
    assert _gone(children), "esper up left processes behind"

    # A restart reuses the same data and the same NATS port.
    again = Stack(home)
    try:
        assert json.loads((home / "endpoints.json").read_text()) == endpoints
        rows = json.loads(_esper(home, "kernels", "--json").stdout)
        assert [r["status"] for r in rows] == ["ready"]
    finally:
        again.stop()
