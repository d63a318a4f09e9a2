"""Endpoint resolution: settings win, endpoints.json fills the gaps, and nothing
at all is a ConfigError that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.errors import ConfigError
from esper.infra.endpoints import (
    Endpoints,
    resolve_database_url,
    resolve_endpoints,
    write_endpoints,
)
from esper.settings import Settings

DB = "postgresql+asyncpg://postgres@/postgres?host=/tmp/x"


@pytest.fixture(autouse=True)
def _no_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings() reads the environment: a developer's own URLs must not leak in.
    monkeypatch.delenv("ESPER_NATS_URL", raising=False)
    monkeypatch.delenv("ESPER_DATABASE_URL", raising=False)


def test_settings_alone_are_enough(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, nats_url="nats://a:4222", database_url=DB)
    assert resolve_endpoints(settings) == Endpoints(nats_url="nats://a:4222", database_url=DB)


def test_comma_separated_nats_url_is_a_cluster(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, nats_url="nats://a:1, nats://b:2", database_url=DB)
    endpoints = resolve_endpoints(settings)
    assert endpoints.nats_url == ["nats://a:1", "nats://b:2"]
    assert endpoints.nats_servers == ["nats://a:1", "nats://b:2"]


def test_written_file_is_read_back_and_settings_override_it(tmp_path: Path) -> None:
    written = Endpoints(nats_url=["nats://n1:1", "nats://n2:2"], database_url=DB)
    path = write_endpoints(Settings(home=tmp_path / "home"), written)
    assert path == tmp_path / "home" / "endpoints.json"
    assert json.loads(path.read_text()) == {"nats_url": written.nats_url, "database_url": DB}
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temp file

    assert resolve_endpoints(Settings(home=tmp_path / "home")) == written
    mixed = resolve_endpoints(Settings(home=tmp_path / "home", nats_url="nats://env:9"))
    assert mixed == Endpoints(nats_url="nats://env:9", database_url=DB)
    assert resolve_database_url(Settings(home=tmp_path / "home")) == DB


def test_nothing_configured_says_run_esper_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run `esper up`"):
        resolve_endpoints(Settings(home=tmp_path))
    with pytest.raises(ConfigError, match="ESPER_DATABASE_URL"):
        resolve_database_url(Settings(home=tmp_path))
    # Half the URLs, no file: still an error.
    with pytest.raises(ConfigError):
        resolve_endpoints(Settings(home=tmp_path, database_url=DB))


def test_corrupt_endpoints_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "endpoints.json").write_text('{"nats_url": 3}')
    with pytest.raises(ConfigError, match="not a valid endpoints file"):
        resolve_endpoints(Settings(home=tmp_path))


def test_endpoints_are_frozen() -> None:
    endpoints = Endpoints(nats_url="nats://a:1", database_url=DB)
    with pytest.raises(ValueError, match="frozen"):
        endpoints.database_url = "x"  # type: ignore[misc]
