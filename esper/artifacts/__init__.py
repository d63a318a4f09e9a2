"""Kernel artifacts: a versioned, content-addressed, Ed25519-signed container of a
compiled blueprint (manifest, generated source, binaries, IR). Never pickled."""

from esper.artifacts.format import (
    FORMAT_VERSION,
    Artifact,
    ArtifactManifest,
    canonical_json,
    digest_of,
    read_manifest_unverified,
    unpack_verified,
)
from esper.errors import ArtifactError, ArtifactIntegrityError, ArtifactSignatureError

__all__ = [
    "FORMAT_VERSION",
    "Artifact",
    "ArtifactError",
    "ArtifactIntegrityError",
    "ArtifactManifest",
    "ArtifactSignatureError",
    "canonical_json",
    "digest_of",
    "read_manifest_unverified",
    "unpack_verified",
]
