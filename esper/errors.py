"""The one error tree. Each subclass also inherits the builtin it resembles, so
callers that know nothing of Esper can still catch it sensibly."""

from __future__ import annotations


class EsperError(Exception):
    """Root of every error Esper raises on purpose."""


class IRValidationError(EsperError, ValueError):
    """A blueprint is malformed; the message names the node id and op."""


class ConfigError(EsperError, ValueError):
    """A setting is missing or invalid."""


class ArtifactError(EsperError, ValueError):
    """A kernel artifact was refused; nothing from it was imported or launched."""


class ArtifactSignatureError(ArtifactError):
    """The artifact is unsigned, tampered with, or signed by a key we do not trust."""


class ArtifactIntegrityError(ArtifactError):
    """The artifact is malformed, oversized, or a file does not match its digest."""


class ServerStartError(EsperError, RuntimeError):
    """An embedded server (nats-server, PostgreSQL) failed to start or become ready."""
