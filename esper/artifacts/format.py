"""The kernel artifact: a manifest, its files, and a signed, canonical tar container.

The container is a plain ustar archive (``tar tf`` lists it) written one way only
(sorted members, mtime 0, uid/gid 0, mode 0644, no directories), so equal inputs give equal bytes
and ``unpack_verified`` can insist that an archive is byte-for-byte the one it
would itself write: every byte is then covered by the signature or by a digest
the signature covers. Nothing in an artifact is ever unpickled or executed here.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esper.errors import ArtifactIntegrityError, ArtifactSignatureError

FORMAT_VERSION = 1

MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "signature"
FILES_PREFIX = "files/"
# Signed bytes = context + canonical manifest, so an Esper signature can never be
# replayed as a signature over anything else made with the same key.
SIGNATURE_CONTEXT = b"esper.artifact.v1\n"

MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
MAX_FILES = 1024
MAX_PATH_CHARS = 100 - len(FILES_PREFIX)  # the whole member name fits ustar's 100 bytes

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# Components start with a letter, digit or underscore: no "..", no ".", no hidden
# files, no absolute paths, no backslashes, no empty components.
_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")
_NAME = re.compile(r"^[a-z][a-z0-9_.:\-]{0,31}$")


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8, finite numbers only,
    string keys only (so ``{1: x}`` and ``{"1": x}`` can never collide)."""
    _check_jsonable(obj, "$")
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _check_jsonable(obj: Any, where: str) -> None:
    if obj is None or isinstance(obj, (bool, int, str)):
        return
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{where}: non-finite float {obj!r} is not canonical JSON")
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_jsonable(item, f"{where}[{i}]")
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            _check_jsonable(value, f"{where}.{key}")
        return
    raise ValueError(f"{where}: {type(obj).__name__} is not JSON-able")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(packed: bytes) -> str:
    """The content address of a packed artifact: sha256 hex of its bytes."""
    return sha256_hex(packed)


def check_file_path(path: str) -> str:
    """Accept a relative POSIX path of safe components, or raise ValueError."""
    if not isinstance(path, str) or not _PATH.match(path) or len(path) > MAX_PATH_CHARS:
        raise ValueError(
            f"artifact file path {path!r} is not a safe relative path "
            f"([A-Za-z0-9_.-] components, none starting with '.', at most {MAX_PATH_CHARS} chars)"
        )
    return path


class ArtifactManifest(BaseModel):
    """What an artifact is and holds; signed, and the signature covers every file
    digest, so the manifest vouches for every byte of the artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format_version: int
    cache_key: str = Field(pattern=_HEX64.pattern)
    blueprint_hash: str = Field(pattern=_HEX64.pattern)
    target: str = Field(pattern=_NAME.pattern)
    dtype: str = Field(min_length=1, max_length=16)
    backend: str = Field(pattern=_NAME.pattern)
    versions: dict[str, str]
    options: dict[str, Any]
    files: dict[str, str]
    created_at: str

    @field_validator("options")
    @classmethod
    def _options_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        canonical_json(v)
        return v

    @field_validator("files")
    @classmethod
    def _files_safe(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_FILES:
            raise ValueError(f"{len(v)} files; at most {MAX_FILES}")
        for path, digest in v.items():
            check_file_path(path)
            if not _HEX64.match(digest):
                raise ValueError(f"file {path!r}: digest {digest!r} is not sha256 hex")
        # A path may not also be a directory of another path (extract_to could not
        # write both).
        dirs = {p[:i] for p in v for i, c in enumerate(p) if c == "/"}
        clash = dirs & v.keys()
        if clash:
            raise ValueError(f"paths {sorted(clash)} are both files and directories")
        return v

    @field_validator("created_at")
    @classmethod
    def _iso(cls, v: str) -> str:
        datetime.fromisoformat(v)
        return v

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))


@dataclass(frozen=True, slots=True)
class Artifact:
    """A manifest and the files it lists (e.g. ``ir.json``, ``kernels.py``,
    ``kernels/fwd0.cubin``). Built by compilers; returned by ``unpack_verified``."""

    manifest: ArtifactManifest
    files: Mapping[str, bytes]

    @classmethod
    def build(
        cls,
        *,
        cache_key: str,
        blueprint_hash: str,
        target: str,
        dtype: str,
        backend: str,
        versions: Mapping[str, str],
        options: Mapping[str, Any],
        files: Mapping[str, bytes],
        created_at: str | None = None,
    ) -> Artifact:
        """Compute every file's digest and assemble the manifest."""
        for path, data in files.items():
            check_file_path(path)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"artifact file {path!r} must be bytes, not {type(data).__name__}")
        frozen = {p: bytes(files[p]) for p in sorted(files)}
        manifest = ArtifactManifest(
            format_version=FORMAT_VERSION,
            cache_key=cache_key,
            blueprint_hash=blueprint_hash,
            target=target,
            dtype=dtype,
            backend=backend,
            versions=dict(versions),
            # A JSON round trip turns tuples into lists, so the manifest holds
            # exactly what a reader will see.
            options=json.loads(canonical_json(dict(options))),
            files={p: sha256_hex(d) for p, d in frozen.items()},
            created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return cls(manifest=manifest, files=MappingProxyType(frozen))

    def pack(self, private_key: Ed25519PrivateKey) -> bytes:
        """The signed archive; deterministic (Ed25519 signatures are)."""
        manifest_bytes = self.manifest.canonical_bytes()
        signature = private_key.sign(SIGNATURE_CONTEXT + manifest_bytes)
        packed = _serialize(manifest_bytes, signature, self.files)
        if len(packed) > MAX_ARTIFACT_BYTES:
            raise ValueError(
                f"artifact would be {len(packed)} bytes; "
                f"loaders accept at most {MAX_ARTIFACT_BYTES}"
            )
        return packed

    def text(self, path: str) -> str:
        """A file decoded as UTF-8 (source, IR, metadata JSON)."""
        return self.files[path].decode("utf-8")

    def extract_to(self, directory: Path) -> Path:
        """Write the files under ``directory`` (e.g. for a loader that needs paths,
        such as Triton's CompiledKernel); paths were checked when built or verified."""
        directory = Path(directory)
        for path, data in self.files.items():
            dest = directory.joinpath(*path.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return directory


# -- the container: ustar written and read here, byte for byte -------------------
# Not through ``tarfile``: its header bytes vary between Python versions (e.g. the
# device fields), and the verifier re-serialises an archive and compares bytes, so
# an artifact packed on 3.11 must re-serialise identically on 3.12.

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_TRAILER = bytes(2 * _BLOCK)


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _header(name: str, size: int) -> bytes:
    """One ustar header: regular file, mode 0644, uid/gid 0, mtime 0, no owner names."""
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than 100 bytes")
    head = b"".join(
        (
            raw.ljust(100, b"\0"),
            _octal(0o644, 8),
            _octal(0, 8),  # uid
            _octal(0, 8),  # gid
            _octal(size, 12),
            _octal(0, 12),  # mtime
            b" " * 8,  # checksum placeholder
            b"0",  # regular file
            bytes(100),  # linkname
            b"ustar\x0000",
            bytes(32 + 32),  # uname, gname
            _octal(0, 8) * 2,  # devmajor, devminor
            bytes(155 + 12),  # prefix, pad
        )
    )
    if len(head) != _BLOCK:  # a size beyond the 11 octal digits of ustar
        raise ValueError(f"member {name!r} of {size} bytes does not fit a ustar header")
    checksum = b"%06o\0 " % sum(head)
    return head[:148] + checksum + head[156:]


def _serialize(manifest_bytes: bytes, signature: bytes, files: Mapping[str, bytes]) -> bytes:
    members = [(MANIFEST_MEMBER, manifest_bytes), (SIGNATURE_MEMBER, signature)]
    members += [(FILES_PREFIX + p, files[p]) for p in sorted(files)]
    parts: list[bytes] = []
    for name, data in members:
        parts += (_header(name, len(data)), data, bytes(-len(data) % _BLOCK))
    parts.append(_TRAILER)
    return b"".join(parts)


def _parse_header(block: bytes) -> tuple[str, bytes, int]:
    """(name, typeflag, size) of a header block; other fields are checked by the
    canonical comparison at the end of verification."""
    stored = block[148:156]
    if int(stored.split(b"\0")[0].strip() or b"-1", 8) != sum(
        block[:148] + b" " * 8 + block[156:]
    ):
        raise ArtifactIntegrityError("tar header checksum mismatch")
    name = block[:100].split(b"\0")[0].decode("ascii")
    if block[345:500].strip(b"\0"):
        raise ArtifactIntegrityError(f"member {name!r} uses a ustar name prefix")
    size_field = block[124:136].split(b"\0")[0].strip()
    if not size_field or any(c not in b"01234567" for c in size_field):
        raise ArtifactIntegrityError(f"member {name!r} has a malformed size field")
    return name, block[156:157], int(size_field, 8)


def _read_members(packed: bytes) -> dict[str, bytes]:
    """Parse the archive into member bytes, refusing anything but a flat set of
    uniquely named regular files with safe names. Nothing touches the filesystem."""
    if not isinstance(packed, (bytes, bytearray)):
        raise ArtifactIntegrityError(f"artifact must be bytes, not {type(packed).__name__}")
    if len(packed) > MAX_ARTIFACT_BYTES:
        raise ArtifactIntegrityError(
            f"artifact is {len(packed)} bytes; at most {MAX_ARTIFACT_BYTES} are accepted"
        )
    packed = bytes(packed)
    members: dict[str, bytes] = {}
    pos = 0
    try:
        while True:
            block = packed[pos : pos + _BLOCK]
            if len(block) < _BLOCK:
                raise ArtifactIntegrityError("archive is truncated (no end-of-archive marker)")
            if block == _ZERO_BLOCK:
                break  # the rest is checked by the canonical comparison
            name, kind, size = _parse_header(block)
            if len(members) >= MAX_FILES + 2:
                raise ArtifactIntegrityError(f"more than {MAX_FILES} files")
            if kind not in (b"0", b"\0"):
                raise ArtifactIntegrityError(f"member {name!r} is not a regular file")
            if name in members:
                raise ArtifactIntegrityError(f"duplicate member {name!r}")
            if name not in (MANIFEST_MEMBER, SIGNATURE_MEMBER):
                if not name.startswith(FILES_PREFIX):
                    raise ArtifactIntegrityError(f"unexpected member {name!r}")
                try:
                    check_file_path(name[len(FILES_PREFIX) :])
                except ValueError as exc:
                    raise ArtifactIntegrityError(f"unsafe member name {name!r}") from exc
            start = pos + _BLOCK
            if start + size > len(packed):
                raise ArtifactIntegrityError(f"member {name!r} is truncated")
            members[name] = packed[start : start + size]
            pos = start + size + (-size % _BLOCK)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ArtifactIntegrityError):
            raise
        raise ArtifactIntegrityError(f"artifact is not a valid archive: {exc}") from exc
    return members


def read_manifest_unverified(packed: bytes) -> ArtifactManifest:
    """The manifest WITHOUT checking the signature: for metadata and display only
    (e.g. filling a durable store's metadata row). Never load code from this."""
    members = _read_members(packed)
    raw = members.get(MANIFEST_MEMBER)
    if raw is None:
        raise ArtifactIntegrityError("artifact has no manifest.json")
    return _parse_manifest(raw)


def _parse_manifest(raw: bytes) -> ArtifactManifest:
    try:
        return ArtifactManifest.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ArtifactIntegrityError(f"malformed manifest: {exc}") from exc


def unpack_verified(packed: bytes, public_key: Ed25519PublicKey) -> Artifact:
    """Parse, verify and return an artifact; raise before returning anything if
    the signature, any digest, or any byte of the container is not as signed."""
    members = _read_members(packed)
    manifest_bytes = members.pop(MANIFEST_MEMBER, None)
    signature = members.pop(SIGNATURE_MEMBER, None)
    if signature is None:
        raise ArtifactSignatureError("artifact is unsigned (no signature member)")
    if manifest_bytes is None:
        raise ArtifactIntegrityError("artifact has no manifest.json")
    try:
        public_key.verify(signature, SIGNATURE_CONTEXT + manifest_bytes)
    except InvalidSignature:
        raise ArtifactSignatureError(
            "artifact signature does not verify with the trusted public key: "
            "the manifest was tampered with or it was signed by another key"
        ) from None
    manifest = _parse_manifest(manifest_bytes)
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactIntegrityError(
            f"artifact format version {manifest.format_version}; this Esper reads {FORMAT_VERSION}"
        )
    files = {name[len(FILES_PREFIX) :]: data for name, data in members.items()}
    unlisted = files.keys() - manifest.files.keys()
    missing = manifest.files.keys() - files.keys()
    if unlisted or missing:
        raise ArtifactIntegrityError(
            f"archive files differ from the manifest: unlisted {sorted(unlisted)}, "
            f"missing {sorted(missing)}"
        )
    for path, expected in manifest.files.items():
        if sha256_hex(files[path]) != expected:
            raise ArtifactIntegrityError(f"file {path!r} does not match its signed digest")
    # Headers, padding and order are not signed: insist they are exactly what
    # pack() writes, so no byte of the container is unauthenticated.
    if manifest.canonical_bytes() != manifest_bytes or (
        _serialize(manifest_bytes, signature, files) != packed
    ):
        raise ArtifactIntegrityError("archive is not in canonical form (container was altered)")
    ordered = {p: files[p] for p in sorted(files)}
    return Artifact(manifest=manifest, files=MappingProxyType(ordered))
