"""Ed25519 keys for artifacts: compile workers sign with the private key, trainers
verify with the public key. Keys are unencrypted PEM files (private: mode 0600)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from esper.errors import ConfigError

DEFAULT_KEY_NAME = "signing.pem"


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def public_key_path(private_path: Path) -> Path:
    """Where the public half of ``private_path`` lives: ``signing.pem`` → ``signing.pub``."""
    private_path = Path(private_path)
    if private_path.suffix == ".pub":
        raise ConfigError(f"{private_path} looks like a public key, not a private key path")
    return private_path.with_suffix(".pub")


def default_private_key_path(home: Path) -> Path:
    return Path(home) / "keys" / DEFAULT_KEY_NAME


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key (sha256 of its raw bytes, 16 hex)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_temp(directory: Path, data: bytes, mode: int) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-key-")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(data: bytes, dest: Path, mode: int) -> bool:
    """Atomically create ``dest`` with ``data``; False if it already exists (no
    partial file is ever visible, and an existing file is never overwritten)."""
    tmp = _write_temp(dest.parent, data, mode)
    try:
        os.link(tmp, dest)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    _fsync_dir(dest.parent)
    return True


def _replace(data: bytes, dest: Path, mode: int) -> None:
    tmp = _write_temp(dest.parent, data, mode)
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def save_keypair(
    private_path: Path, private_key: Ed25519PrivateKey | None = None
) -> tuple[Path, Path]:
    """Write ``private_path`` (PEM, 0600) and its ``.pub`` twin; generate a key if
    none is given. Refuses to overwrite an existing private key."""
    private_path = Path(private_path)
    pub_path = public_key_path(private_path)
    key = private_key if private_key is not None else Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    if not _link_new(private_pem(key), private_path, 0o600):
        raise ConfigError(f"{private_path} already exists; refusing to overwrite a signing key")
    _replace(public_pem(key.public_key()), pub_path, 0o644)
    return private_path, pub_path


def ensure_keypair(home: Path) -> Path:
    """The embedded default: ``home/keys/signing.pem`` (+ ``signing.pub``), made
    once. Safe when several processes race: exactly one key wins, all use it."""
    private_path = default_private_key_path(home)
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not private_path.exists():
        _link_new(private_pem(Ed25519PrivateKey.generate()), private_path, 0o600)
    pub_path = public_key_path(private_path)
    expected = public_pem(load_private_key(private_path).public_key())
    if not pub_path.exists() or pub_path.read_bytes() != expected:
        # Derived from the winning private key, so racing writers write equal bytes.
        _replace(expected, pub_path, 0o644)
    return private_path


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key; given a private key file, its public half."""
    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key
