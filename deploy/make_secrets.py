"""Make the secrets a cluster deployment reads from files, into one directory
(default ``deploy/secrets``, git-ignored): a private CA and the NATS servers'
certificate, the NATS user's nkey seed and a password, the artifact-signing key
pair and the PostgreSQL password; plus ``deploy/.env`` with the two values
compose interpolates (the nkey's PUBLIC key, the database password).

    python deploy/make_secrets.py [--out DIR] [--dns NAME ...] [--force]

Needs ``cryptography`` and ``nkeys`` (both installed with Esper). Files that
containers mount are mode 0644 inside a 0700 directory (the image's user,
uid 10001, must read the bind mounts); the CA's key is 0600 and mounted nowhere:
keep it offline, it only issues more certificates."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
# Compose service names, the Helm chart's service and pod names (release "nats",
# namespace "esper"), and loopback for a client on the Docker host.
DEFAULT_DNS = (
    "nats-1", "nats-2", "nats-3", "localhost",
    "nats", "nats.esper", "nats.esper.svc", "nats.esper.svc.cluster.local",
    "*.nats-headless", "*.nats-headless.esper", "*.nats-headless.esper.svc",
    "*.nats-headless.esper.svc.cluster.local",
)
VALID_DAYS = 825


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, dns: tuple[str, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS * (4 if ca else 1)))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = (
            builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            # serverAuth for clients, clientAuth for the mutual-TLS routes between nodes.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_secrets(out: Path, dns: tuple[str, ...] = DEFAULT_DNS) -> dict[str, str]:
    """Write every secret file into ``out``; return the values for ``.env``."""
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    files: dict[str, tuple[bytes, int]] = {}
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = _cert("Esper NATS CA", ca_key, None, ca_key)
    server = _cert("nats", server_key, ca, ca_key, dns)
    pem = serialization.Encoding.PEM
    files["ca.crt"] = (ca.public_bytes(pem), 0o644)
    files["ca.key"] = (_pem_key(ca_key), 0o600)
    files["nats-server.crt"] = (server.public_bytes(pem) + ca.public_bytes(pem), 0o644)
    files["nats-server.key"] = (_pem_key(server_key), 0o644)

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public_nkey = nkeys.from_seed(bytearray(seed)).public_key.decode()
    files["nats-user.nk"] = (seed + b"\n", 0o644)
    files["nats-user.pub"] = (public_nkey.encode() + b"\n", 0o644)
    # URL-safe (it travels inside nats:// and postgresql:// URLs).
    nats_password, pg_password = secrets.token_hex(24), secrets.token_hex(24)
    files["nats-password"] = (nats_password.encode(), 0o644)
    files["postgres-password"] = (pg_password.encode(), 0o644)

    signing = ed25519.Ed25519PrivateKey.generate()
    files["signing.pem"] = (_pem_key(signing), 0o644)
    files["signing.pub"] = (signing.public_key().public_bytes(
        pem, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)

    for name, (data, mode) in files.items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path.chmod(mode)
    return {"NATS_USER_NKEY": public_nkey, "POSTGRES_PASSWORD": pg_password}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "secrets")
    p.add_argument("--env-file", type=Path, default=HERE / ".env",
                   help="where compose finds NATS_USER_NKEY and POSTGRES_PASSWORD")
    p.add_argument("--dns", action="append", default=[],
                   help="another DNS name for the NATS certificate (repeatable)")
    p.add_argument("--force", action="store_true", help="replace existing secrets")
    args = p.parse_args(argv)
    if (args.out / "ca.key").exists() and not args.force:
        print(f"{args.out} already holds secrets; --force replaces them", file=sys.stderr)
        return 1
    values = make_secrets(args.out, (*DEFAULT_DNS, *args.dns))
    env = "".join(f"{k}={v}\n" for k, v in values.items())
    fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(env)
    print(f"secrets in {args.out}; {', '.join(values)} in {args.env_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
