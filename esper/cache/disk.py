"""Tier 2: a local content-addressed store of packed artifacts, shared safely by
every process on the machine.

Layout: ``root/objects/ab/cdef…`` holds the bytes whose sha256 is ``abcdef…``;
``root/keys/<cache_key>`` holds the digest for a key. Every write is temp file →
fsync → ``os.replace`` → fsync of the directory, so a reader sees a whole file or
none, and racing writers of one key leave one complete, valid entry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path

from esper.artifacts.format import sha256_hex

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _check_hex(value: str, what: str) -> str:
    # Keys and digests become file names: only sha256 hex may pass.
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"{what} must be 64 lowercase hex chars, got {value!r}")
    return value


def _atomic_write(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


class DiskTier:
    """Packed artifacts on local disk, by digest and by cache key."""

    name = "disk"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.keys = self.root / "keys"
        self.keys.mkdir(parents=True, exist_ok=True)
        self.objects.mkdir(parents=True, exist_ok=True)

    def object_path(self, digest: str) -> Path:
        _check_hex(digest, "digest")
        return self.objects / digest[:2] / digest[2:]

    def get(self, digest: str) -> bytes | None:
        """The bytes with this digest, or None (a corrupt object counts as absent
        and is removed, so the next put rewrites it)."""
        path = self.object_path(digest)
        data = _read(path)
        if data is None:
            return None
        if sha256_hex(data) != digest:
            log.warning("disk cache object %s is corrupt; removing it", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return data

    def digest_for(self, cache_key: str) -> str | None:
        raw = _read(self.keys / _check_hex(cache_key, "cache_key"))
        if raw is None:
            return None
        digest = raw.decode("ascii", "replace").strip()
        if not _HEX64.match(digest):
            log.warning("disk cache key file for %s is corrupt; ignoring it", cache_key)
            return None
        return digest

    def get_by_key(self, cache_key: str) -> bytes | None:
        digest = self.digest_for(cache_key)
        return None if digest is None else self.get(digest)

    def put_object(self, packed: bytes) -> str:
        digest = sha256_hex(packed)
        path = self.object_path(digest)
        # Content-addressed: an existing intact object is already the right bytes.
        if self.get(digest) is None:
            path.parent.mkdir(exist_ok=True)
            _atomic_write(path, packed)
        return digest

    def put(self, cache_key: str, packed: bytes) -> str:
        """Store the bytes and point the key at them; returns the digest. The
        object is written before the key, so a key never names a missing object."""
        _check_hex(cache_key, "cache_key")
        digest = self.put_object(packed)
        if self.digest_for(cache_key) != digest:
            _atomic_write(self.keys / cache_key, digest.encode("ascii"))
        return digest

    def discard_key(self, cache_key: str) -> None:
        """Forget a key (e.g. its artifact failed verification); objects stay."""
        with contextlib.suppress(FileNotFoundError):
            (self.keys / _check_hex(cache_key, "cache_key")).unlink()

    def usage(self) -> dict[str, int]:
        """Counts for ``esper kernels --stats``: keys, objects and their bytes."""
        keys = sum(1 for p in self.keys.iterdir() if not p.name.startswith("."))
        objects = total = 0
        for shard in self.objects.iterdir():
            if not shard.is_dir():
                continue
            for p in shard.iterdir():
                if not p.name.startswith("."):
                    objects += 1
                    total += p.stat().st_size
        return {"keys": keys, "objects": objects, "bytes": total}
