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


class CompileError(EsperError, RuntimeError):
    """A backend failed to lower or compile a blueprint; the message names the node."""


class UnknownBackendError(CompileError, LookupError):
    """No backend is registered under the requested name."""


class InputMismatchError(EsperError, ValueError):
    """Tensors given to a blueprint module do not match its declared inputs."""


class MalformedEvent(EsperError, ValueError):
    """A message cannot be decoded into the event its subject promises; it is
    dead-lettered at once, never retried."""

    def __init__(self, subject: str, problem: str) -> None:
        super().__init__(f"malformed event on {subject}: {problem}")
        self.subject = subject
        self.problem = problem


class Retry(EsperError):
    """Raised by a handler: roll back and redeliver after ``delay`` seconds
    (None: the runtime's backoff for this delivery count)."""

    def __init__(self, reason: str = "retry requested", delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(EsperError):
    """Raised by a handler: the message can never succeed; roll back, dead-letter
    it with ``reason`` and stop redelivery."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IllegalTransition(EsperError, RuntimeError):
    """A seed was asked to move between lifecycle states the table does not allow."""


class NatsAuthError(EsperError, ConnectionError):
    """NATS refused this client for good: wrong credentials, or a TLS certificate
    that does not verify. Retrying cannot help; the message says what to fix."""


class ReplicaDivergenceError(EsperError, RuntimeError):
    """Data-parallel replicas no longer hold bit-identical model state (``esper
    train --ddp``): a decision or a load was applied on some ranks only."""
