"""The one error tree. Each subclass also inherits the builtin it resembles, so
callers that know nothing of Esper can still catch it sensibly."""

from __future__ import annotations


class EsperError(Exception):
    """Root of every error Esper raises on purpose."""


class IRValidationError(EsperError, ValueError):
    """A blueprint is malformed; the message names the node id and op."""


class ConfigError(EsperError, ValueError):
    """A setting is missing or invalid."""
