"""Signing keys: files, permissions, the race-safe embedded default, the CLI."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from esper.artifacts import signing
from esper.cli import main
from esper.errors import ConfigError


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    private, public = signing.generate_keypair()
    priv_path, pub_path = signing.save_keypair(tmp_path / "k" / "signing.pem", private)
    assert pub_path == tmp_path / "k" / "signing.pub"
    assert stat.S_IMODE(priv_path.stat().st_mode) == 0o600
    loaded = signing.load_private_key(priv_path)
    message = b"hello"
    signing.load_public_key(pub_path).verify(loaded.sign(message), message)
    public.verify(loaded.sign(message), message)
    # A private key file also yields its public half.
    assert signing.fingerprint(signing.load_public_key(priv_path)) == signing.fingerprint(public)
    assert not list((tmp_path / "k").glob(".tmp-*"))


def test_save_keypair_generates_and_never_overwrites(tmp_path: Path) -> None:
    path, _ = signing.save_keypair(tmp_path / "a.pem")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        signing.save_keypair(path)
    assert path.read_bytes() == before


def test_bad_key_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        signing.load_private_key(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        signing.load_private_key(junk)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        signing.load_public_key(junk)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_path = tmp_path / "ec.pem"
    ec_path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="not an Ed25519"):
        signing.load_private_key(ec_path)
    with pytest.raises(ConfigError, match="public key"):
        signing.public_key_path(tmp_path / "x.pub")


def test_ensure_keypair_is_idempotent(tmp_path: Path) -> None:
    path = signing.ensure_keypair(tmp_path)
    assert path == tmp_path / "keys" / "signing.pem"
    first = path.read_bytes()
    (tmp_path / "keys" / "signing.pub").unlink()
    assert signing.ensure_keypair(tmp_path) == path
    assert path.read_bytes() == first
    pub = signing.load_public_key(tmp_path / "keys" / "signing.pub")
    assert signing.fingerprint(pub) == signing.fingerprint(
        signing.load_private_key(path).public_key()
    )


def test_ensure_keypair_races_to_one_key(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from esper.artifacts import signing;"
        "p = signing.ensure_keypair(Path(sys.argv[1]));"
        "print(signing.fingerprint(signing.load_private_key(p).public_key()))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    prints = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    on_disk = signing.fingerprint(signing.load_public_key(tmp_path / "keys" / "signing.pub"))
    assert prints == {on_disk}


def test_cli_generate_and_show_public(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ci" / "key.pem"
    assert main(["keys", "generate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"private key: {out}" in printed
    assert f"public key:  {tmp_path / 'ci' / 'key.pub'}" in printed
    assert main(["keys", "generate", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["keys", "show-public", str(tmp_path / "ci" / "key.pub")]) == 0
    shown = capsys.readouterr()
    assert shown.out == (tmp_path / "ci" / "key.pub").read_text()
    assert shown.out.startswith("-----BEGIN PUBLIC KEY-----")
    assert main(["keys", "show-public", str(tmp_path / "none.pub")]) == 1
