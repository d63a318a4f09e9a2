"""`esper demo` as a user runs it: a fresh data dir, embedded servers, every stage,
one growing trainer; exit 0, a rejection shown, seeds fossilized, the SQL and
the PNG written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.runtime_helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_esper_demo_runs_end_to_end(tmp_path: Path) -> None:
    # Only this demo's own embedded servers: no ESPER_* from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPER_")}
    env["PYTHONPATH"] = str(REPO)
    png = tmp_path / "demo.png"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "esper", "demo", "--home", str(tmp_path / "home"),
         "--png", str(png)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    elapsed = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, f"{out[-4000:]}\n{done.stderr[-4000:]}"
    print(f"esper demo took {elapsed:.1f}s")

    counts = re.search(r"kernels: (\d+) compiled, (\d+) validated, (\d+) deployed, "
                       r"(\d+) rejected", out)
    assert counts is not None, out
    compiled, validated, deployed, rejected = map(int, counts.groups())
    assert compiled == 6 and deployed == 5 and rejected == 1, counts.group(0)
    assert validated == deployed
    assert re.search(r"unsafe_graft_mlp\s+cpu\s+torch\s+rejected", out)
    assert "graft_safety" in out

    seeds = re.search(r"seeds: (\d+) germinated, (\d+) fossilized, (\d+) culled", out)
    assert seeds is not None
    assert int(seeds.group(2)) >= 1
    # The journey of a grown kernel, from SQL: pipeline, then seed, in order.
    journey = [line.split()[3] for line in out.splitlines()
               if re.match(r"\s+\d\d:\d\d:\d\d\.\d+\s+residual_mlp\s+(kernel|seed)\s", line)]
    assert journey[:8] == ["compiled", "validated", "ready", "germinated", "training",
                           "grafting", "stabilization", "fossilized"]
    assert "FROM kernel_history" in out and "FROM seed_events" in out

    losses = dict(re.findall(r"(growing host|start size|grown size)[^\n]*?(\d\.\d{4})\n", out))
    assert float(losses["growing host"]) < float(losses["start size"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5_000
