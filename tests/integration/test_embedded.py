"""Embedded servers are real, keep their data across stops, restarts and
SIGKILLs, and a 3-node JetStream cluster keeps replicated data when a node dies."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from esper.errors import ConfigError
from esper.infra import pgadmin
from esper.infra.embedded import NatsServer, PostgresServer, nats_server_binary
from esper.infra.ports import port_open

pytestmark = pytest.mark.integration


async def _stream_count(url: str | list[str], stream: str) -> int:
    nc = await nats.connect(servers=url, connect_timeout=2, max_reconnect_attempts=1)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def _publish(url: str, stream: str, n: int, start: int = 0) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
        for i in range(start, start + n):
            await js.publish(f"{stream.lower()}.x", f"m{i}".encode())
    finally:
        await nc.close()


# -- NATS -----------------------------------------------------------------------


async def test_nats_stream_survives_graceful_restart_and_sigkill(
    nats_factory: Callable[..., NatsServer],
) -> None:
    server = nats_factory()
    assert server.url == f"nats://127.0.0.1:{server.port}"
    port = server.port

    await _publish(server.url, "KEEP", 10)
    await asyncio.to_thread(server.restart)
    assert server.port == port and server.running
    assert any(server.store_dir.rglob("*")), "JetStream wrote nothing under store_dir"
    assert await _stream_count(server.url, "KEEP") == 10

    await _publish(server.url, "KEEP", 5, start=10)
    server.kill()
    assert not server.running and not port_open(port)
    await asyncio.to_thread(server.restart)
    assert await _stream_count(server.url, "KEEP") == 15

    nc = await nats.connect(server.url)
    try:
        last = await nc.jetstream().get_last_msg("KEEP", "keep.x")
        assert last.data == b"m14"
    finally:
        await nc.close()

    server.stop()
    assert not server.running and not port_open(port)


async def test_nats_new_process_on_same_data_dir_sees_old_streams(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    first = nats_factory(data_dir=tmp_path / "shared", sync_always=True)
    assert "sync_interval: always" in first.config_file.read_text()
    await _publish(first.url, "DURABLE", 3)
    first.stop()
    second = nats_factory(data_dir=tmp_path / "shared")
    assert await _stream_count(second.url, "DURABLE") == 3


def test_nats_context_manager_stops_server(tmp_path: Path) -> None:
    with NatsServer.start(tmp_path / "cm") as server:
        port = server.port
        assert port_open(port)
    assert not server.running and not port_open(port)


def test_missing_nats_binary_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="nats-server"):
        nats_server_binary()


# -- PostgreSQL -------------------------------------------------------------------


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(pgadmin.asyncpg_dsn(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch_names(url: str) -> list[str]:
    conn = await asyncpg.connect(pgadmin.asyncpg_dsn(url))
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM t ORDER BY name")]
    finally:
        await conn.close()


async def test_postgres_rows_survive_restart_and_sigkill(
    pg_factory: Callable[..., PostgresServer],
) -> None:
    pg = pg_factory()
    assert pg.url.startswith("postgresql+asyncpg://postgres@/postgres?host=/")
    await _execute(pg.url, "CREATE TABLE t (name text); INSERT INTO t VALUES ('before-restart')")

    await asyncio.to_thread(pg.restart)
    assert pg.running
    assert await _fetch_names(pg.url) == ["before-restart"]

    # A committed row survives a crash: postgres replays its WAL on start.
    await _execute(pg.url, "INSERT INTO t VALUES ('before-kill')")
    pid = pg.pid
    pg.kill()
    assert not pg.running and pid is not None
    await asyncio.to_thread(pg.restart)
    assert pg.pid != pid
    assert await _fetch_names(pg.url) == ["before-kill", "before-restart"]

    url = pg.url
    pg.stop()
    assert not pg.running and pg.url == url  # the URL stays valid for a later restart
    with pytest.raises(OSError):
        await _fetch_names(url)


async def test_postgres_new_handle_on_same_data_dir(
    tmp_path: Path, pg_factory: Callable[..., PostgresServer]
) -> None:
    with PostgresServer.start(tmp_path / "pg") as pg:
        await _execute(pg.url, "CREATE TABLE t (name text); INSERT INTO t VALUES ('kept')")
        url = pg.url
    assert not pg.running
    again = await asyncio.to_thread(PostgresServer.start, tmp_path / "pg")
    try:
        assert again.url == url
        assert await _fetch_names(again.url) == ["kept"]
    finally:
        again.stop()


async def test_database_url_fixture_is_fresh_and_sqlalchemy_reaches_it(
    database_url: str,
) -> None:
    from sqlalchemy import text

    from esper.db.engine import create_engine

    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            name = (await conn.execute(text("SELECT current_database()"))).scalar_one()
            assert name.startswith("esper_test_")
            n = (await conn.execute(text("SELECT count(*) FROM blueprints"))).scalar_one()
            assert n == 0
    finally:
        await engine.dispose()


# -- cluster --------------------------------------------------------------------


async def _publish_retrying(js: JetStreamContext, subject: str, data: bytes) -> None:
    # While a new stream leader is elected, publishes fail; a client retries.
    deadline = time.monotonic() + 20.0
    while True:
        try:
            await js.publish(subject, data, timeout=1.0)
            return
        except (NatsTimeout, NoRespondersError, NoStreamResponseError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_cluster_replicated_stream_survives_killed_leader(
    nats_cluster: list[NatsServer],
) -> None:
    urls = [n.url for n in nats_cluster]
    nc = await nats.connect(servers=urls, reconnect_time_wait=0.1)
    try:
        js = nc.jetstream()
        info = await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
        assert info.config.num_replicas == 3
        for i in range(50):
            await _publish_retrying(js, "r3.x", f"a{i}".encode())

        info = await js.stream_info("R3")
        assert info.cluster is not None and info.cluster.leader is not None
        leader = next(
            n for n in nats_cluster if n.cluster and n.cluster.server_name == info.cluster.leader
        )
        leader.kill()

        for i in range(50):
            await _publish_retrying(js, "r3.x", f"b{i}".encode())
        survivors = [n.url for n in nats_cluster if n is not leader]
        assert await _stream_count(survivors, "R3") == 100

        # The killed node comes back on its ports and data and catches up.
        await asyncio.to_thread(leader.restart)
        deadline = time.monotonic() + 20
        while await _stream_count(leader.url, "R3") != 100:
            assert time.monotonic() < deadline, "restarted node never caught up"
            await asyncio.sleep(0.2)
    finally:
        await nc.close()
