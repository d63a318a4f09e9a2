"""NATS authentication and TLS end to end, against a real nats-server that
requires both: a throwaway CA and server certificate made here, users with a
password and with an nkey. A worker process configured only through ESPER_*
variables handles an event over that link; refusals fail fast and say why.
Also deploy/'s set-up scripts (stream replicas, waiting for the schema) as the
cluster's jobs run them."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from esper.bus import events as ev
from esper.bus.connect import connect
from esper.bus.natsauth import NatsSecurity
from esper.bus.publish import make_submission, publish_event
from esper.bus.topology import Topology, ensure_streams
from esper.cache.durable import BUCKET
from esper.db.engine import create_engine
from esper.errors import ConfigError, NatsAuthError
from esper.infra.cluster import cluster_urls
from esper.infra.nats_server import NatsServer, nats_server_binary
from esper.infra.ports import LOOPBACK, free_port, http_ok, wait_until
from esper.settings import Settings
from tests.integration.runtime_helpers import (
    REPO,
    mlp_blueprint,
    scalar,
    spawn_worker,
    terminate,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

USER, PASSWORD = "esper", "s3cret-Pa55"


# -- throwaway PKI -------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _issue(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
            ]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: trusting it must not be enough."""


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _issue("esper test CA", ca_key, None, ca_key, ca=True)
    other = _issue("unrelated CA", other_key, None, other_key, ca=True)
    return Pki(
        ca=_write_cert(ca, d / "ca.crt"),
        server_cert=_write_cert(_issue("nats", server_key, ca, ca_key, server=True),
                                d / "server.crt"),
        server_key=_write_key(server_key, d / "server.key"),
        client_cert=_write_cert(_issue("esper-worker", client_key, ca, ca_key),
                                d / "client.crt"),
        client_key=_write_key(client_key, d / "client.key"),
        other_ca=_write_cert(other, d / "other-ca.crt"),
    )


def make_nkey_seed(path: Path) -> str:
    """Write a fresh user nkey seed to ``path``; return its public key."""
    import secrets

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed)
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


# -- a nats-server that wants TLS and credentials --------------------------------------


@dataclass
class SecureNats:
    port: int
    pki: Pki
    seed_file: Path
    proc: subprocess.Popen[bytes]

    def url(self, password: str = PASSWORD, scheme: str = "tls") -> str:
        return f"{scheme}://{USER}:{password}@{LOOPBACK}:{self.port}"

    @property
    def bare_url(self) -> str:
        return f"tls://{LOOPBACK}:{self.port}"


def _start(
    d: Path, pki: Pki, public_nkey: str, *, verify_clients: bool
) -> tuple[int, subprocess.Popen[bytes]]:
    port, monitor = free_port(), free_port()
    q = json.dumps
    conf = d / "nats.conf"
    conf.write_text("\n".join([
        f"server_name: {q(f'esper-secure-{port}')}",
        f"listen: {q(f'{LOOPBACK}:{port}')}",
        f"http: {q(f'{LOOPBACK}:{monitor}')}",
        "tls {",
        f"  cert_file: {q(str(pki.server_cert))}",
        f"  key_file: {q(str(pki.server_key))}",
        f"  ca_file: {q(str(pki.ca))}",
        f"  verify: {str(verify_clients).lower()}",
        "  timeout: 2",
        "}",
        "authorization {",
        "  users = [",
        f"    {{ user: {q(USER)}, password: {q(PASSWORD)} }}",
        f"    {{ nkey: {q(public_nkey)} }}",
        "  ]",
        "}",
        f"jetstream {{ store_dir: {q(str(d / 'js'))} }}",
        "",
    ]))
    with (d / "nats.log").open("ab") as log:
        proc = subprocess.Popen([str(nats_server_binary()), "-c", str(conf)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: proc.poll() is None and http_ok(f"http://{LOOPBACK}:{monitor}/healthz"),
                   20, "secure nats-server")
    except BaseException:
        proc.kill()
        raise
    return port, proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNats]:
    d = tmp_path_factory.mktemp("secure-nats")
    pki = make_pki(d / "pki")
    seed = d / "user.nk"
    port, proc = _start(d, pki, make_nkey_seed(seed), verify_clients=False)
    yield SecureNats(port, pki, seed, proc)
    _stop(proc)


async def _publish_roundtrip(url: str, security: NatsSecurity) -> None:
    nc = await connect(url, name="esper-test-secure", connect_timeout=10, security=security)
    try:
        js = nc.jetstream()
        await ensure_streams(js, Topology(), update=False)
        ack = await publish_event(js, make_submission(mlp_blueprint(0)))
        assert ack.stream == "ESPER_BLUEPRINTS"
    finally:
        await nc.close()


# -- tests ------------------------------------------------------------------------------


async def test_a_worker_configured_by_env_handles_an_event_over_tls_with_a_password(
    secure_nats: SecureNats, database_url: str, tmp_path: Path
) -> None:
    security = NatsSecurity(tls_ca=secure_nats.pki.ca)
    nc = await connect(secure_nats.url(), name="esper-test-secure", security=security)
    engine = create_engine(database_url)
    log = tmp_path / "worker.log"
    # The worker learns the CA only from ESPER_NATS_TLS_CA, as in a container.
    worker = spawn_worker("compile", secure_nats.url(), database_url, log_path=log,
                          env={"ESPER_NATS_TLS_CA": str(secure_nats.pki.ca)})
    try:
        js = nc.jetstream()
        await ensure_streams(js, Topology(), update=False)
        submission = make_submission(mlp_blueprint(7))
        await publish_event(js, submission)

        async def compiled() -> bool:
            return await scalar(engine, "SELECT count(*) FROM kernels") == 1

        await wait_for(compiled, 60, f"the worker to handle the event (log: {log})")

        # Its emitted event went back out over the same authenticated TLS link.
        async def announced() -> bool:
            info = await js.stream_info("ESPER_KERNELS", subjects_filter=ev.KERNEL_COMPILED)
            return (info.state.subjects or {}).get(ev.KERNEL_COMPILED) == 1

        await wait_for(announced, 30, "esper.kernel.compiled in the stream")
        async def relayed() -> bool:  # the relay marks its rows after the publish
            return await scalar(engine, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0

        await wait_for(relayed, 30, "the outbox marked sent")
        assert await scalar(engine, "SELECT count(*) FROM dead_letters") == 0
    finally:
        assert terminate(worker) == 0, log.read_text()[-3000:]
        await nc.close()
        await engine.dispose()
    assert PASSWORD not in log.read_text()


async def test_a_wrong_password_is_refused_at_once_with_a_clear_error(
    secure_nats: SecureNats,
) -> None:
    started = time.monotonic()
    with pytest.raises(NatsAuthError) as caught:
        await connect(secure_nats.url(password="not-the-one"), name="esper-test-bad",
                      connect_timeout=20, security=NatsSecurity(tls_ca=secure_nats.pki.ca))
    assert time.monotonic() - started < 5  # not retried until connect_timeout
    message = str(caught.value)
    assert "Authorization Violation" in message and "ESPER_NATS_URL" in message
    assert "not-the-one" not in message and "esper:***@" in message
    assert isinstance(caught.value, ConnectionError)


async def test_a_worker_with_a_wrong_password_exits_saying_why(
    secure_nats: SecureNats, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    worker = spawn_worker("deploy", secure_nats.url(password="not-the-one"), database_url,
                          log_path=log, env={"ESPER_NATS_TLS_CA": str(secure_nats.pki.ca)})
    try:
        code = worker.wait(60)
    finally:
        terminate(worker)
    text = log.read_text()
    assert code != 0
    assert "NatsAuthError" in text and "Authorization Violation" in text, text[-3000:]
    assert "not-the-one" not in text


async def test_missing_credentials_are_refused(secure_nats: SecureNats) -> None:
    with pytest.raises(NatsAuthError, match="Authorization Violation"):
        await connect(secure_nats.bare_url, name="esper-test-anon", connect_timeout=20,
                      security=NatsSecurity(tls_ca=secure_nats.pki.ca))


async def test_a_server_certificate_from_an_untrusted_ca_is_refused(
    secure_nats: SecureNats,
) -> None:
    for security in (NatsSecurity(), NatsSecurity(tls_ca=secure_nats.pki.other_ca)):
        started = time.monotonic()
        with pytest.raises(NatsAuthError, match="ESPER_NATS_TLS_CA"):
            await connect(secure_nats.url(), name="esper-test-untrusted", connect_timeout=20,
                          security=security)
        assert time.monotonic() - started < 5


async def test_a_nats_url_is_upgraded_to_tls_when_the_server_requires_it(
    secure_nats: SecureNats,
) -> None:
    await _publish_roundtrip(secure_nats.url(scheme="nats"),
                             NatsSecurity(tls_ca=secure_nats.pki.ca))


async def test_an_nkey_seed_file_authenticates(secure_nats: SecureNats) -> None:
    security = NatsSecurity.from_settings(Settings(
        nats_creds=secure_nats.seed_file, nats_tls_ca=secure_nats.pki.ca,
    ))
    assert "nkeys_seed" in security.connect_options()
    await _publish_roundtrip(secure_nats.bare_url, security)


async def test_another_nkey_is_refused(secure_nats: SecureNats, tmp_path: Path) -> None:
    other = tmp_path / "other.nk"
    make_nkey_seed(other)
    with pytest.raises(NatsAuthError, match="Authorization Violation"):
        await connect(secure_nats.bare_url, name="esper-test-nkey", connect_timeout=20,
                      security=NatsSecurity(creds=other, tls_ca=secure_nats.pki.ca))


async def test_bad_security_files_are_config_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.creds"
    junk.write_text("not a credential\n")
    with pytest.raises(ConfigError, match="ESPER_NATS_CREDS"):
        NatsSecurity(creds=junk).connect_options()
    with pytest.raises(ConfigError, match="ESPER_NATS_CREDS"):
        NatsSecurity(creds=tmp_path / "missing.creds").connect_options()
    with pytest.raises(ConfigError, match="ESPER_NATS_TLS_CA"):
        NatsSecurity(tls_ca=tmp_path / "missing.crt").connect_options()
    with pytest.raises(ConfigError, match="go together"):
        NatsSecurity(tls_cert=tmp_path / "c.crt").connect_options()


async def test_mutual_tls_needs_the_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port, proc = _start(tmp_path, pki, make_nkey_seed(tmp_path / "u.nk"), verify_clients=True)
    url = f"tls://{USER}:{PASSWORD}@{LOOPBACK}:{port}"
    try:
        with pytest.raises(NatsAuthError, match="ESPER_NATS_TLS_CERT"):
            await connect(url, name="esper-test-mtls", connect_timeout=20,
                          security=NatsSecurity(tls_ca=pki.ca))
        await _publish_roundtrip(url, NatsSecurity(tls_ca=pki.ca, tls_cert=pki.client_cert,
                                                   tls_key=pki.client_key))
    finally:
        _stop(proc)


async def test_connect_gives_up_on_an_unreachable_server_at_its_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach NATS") as caught:
        await connect(f"nats://{USER}:{PASSWORD}@{LOOPBACK}:{free_port()}",
                      name="esper-test-gone", connect_timeout=1.5, security=NatsSecurity())
    assert not isinstance(caught.value, NatsAuthError)
    assert 1.4 < time.monotonic() - started < 6
    assert PASSWORD not in str(caught.value)


# -- deploy/'s set-up scripts, as the jobs run them ------------------------------------------


def _run_script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "deploy" / name), *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        check=False, capture_output=True, text=True, timeout=120,
    )


async def _replicas(url: str | list[str], security: NatsSecurity) -> dict[str, int]:
    nc = await connect(url, name="esper-test-replicas", security=security)
    try:
        js = nc.jetstream()
        names = [s.name for s in Topology().streams] + [f"OBJ_{BUCKET}"]
        return {n: (await js.stream_info(n)).config.num_replicas or 1 for n in names}
    finally:
        await nc.close()


async def test_jetstream_init_job_works_over_tls_with_credentials(
    secure_nats: SecureNats,
) -> None:
    done = _run_script("jetstream_init.py", {
        "ESPER_NATS_URL": secure_nats.bare_url, "ESPER_NATS_CREDS": str(secure_nats.seed_file),
        "ESPER_NATS_TLS_CA": str(secure_nats.pki.ca), "ESPER_STREAM_REPLICAS": "1",
    })
    assert done.returncode == 0, done.stdout + done.stderr
    found = await _replicas(secure_nats.url(), NatsSecurity(tls_ca=secure_nats.pki.ca))
    assert set(found.values()) == {1} and len(found) == 5


async def test_jetstream_init_job_gives_every_stream_three_replicas_on_a_cluster(
    nats_cluster: list[NatsServer],
) -> None:
    urls = cluster_urls(nats_cluster)
    # A trainer that came first made the streams with one replica: they are scaled up.
    nc = await connect(urls, name="esper-test-early", security=NatsSecurity())
    await ensure_streams(nc.jetstream(), Topology(), update=False)
    await nc.close()
    done = _run_script("jetstream_init.py", {"ESPER_NATS_URL": ",".join(urls),
                                             "ESPER_STREAM_REPLICAS": "3"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert set((await _replicas(urls, NatsSecurity())).values()) == {3}


async def test_wait_for_schema_waits_for_the_migrated_database(
    database_url: str, empty_database_url: str
) -> None:
    ready = _run_script("wait_for_schema.py", {"ESPER_DATABASE_URL": database_url})
    assert ready.returncode == 0, ready.stdout + ready.stderr
    waiting = _run_script("wait_for_schema.py", {"ESPER_DATABASE_URL": empty_database_url},
                          "--timeout", "1")
    assert waiting.returncode == 1 and "waiting for" in waiting.stdout
