"""A small version of the published cache trace (benchmarks/bench_cache_trace.py):
Zipf draws over random blueprints, each submitted as a renamed/reordered variant,
served by two real compile worker processes that are SIGKILLed and restarted
twice. Every hittable submission hits, each key compiles once, no false hit."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_cache_trace import make_trace, run_trace
from tests.integration.runtime_helpers import wipe_bus

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


async def test_small_trace_hits_everything_hittable_across_worker_restarts(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    await wipe_bus(nats_url)
    trace = make_trace(n_blueprints=8, n_submissions=200, zipf=1.1, seed=7)
    report = await run_trace(trace, nats_url, database_url, tmp_path / "home", workers=2,
                             restarts=2, sample=30, timeout=600, log=lambda _line: None)
    assert report.submissions == 200 and report.rejected == 0
    assert report.distinct_canonical_hashes > report.distinct_keys  # variants really vary
    assert report.misses == report.distinct_keys  # first sight of each key, and only that
    assert report.hits == report.hittable == 200 - report.distinct_keys
    assert report.wrong_key_hits == 0
    assert report.sampled == 30 and report.false_hits == 0
    # Each key's compile finished once: a killed compile stores nothing, and one
    # stored before a kill is recovered, not redone.
    assert report.artifacts_stored == report.distinct_keys
