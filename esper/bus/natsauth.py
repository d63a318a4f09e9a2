"""How a client proves itself to NATS and checks the server it reached: a
credentials file (user JWT + nkey seed) or a bare nkey seed, a private CA for
TLS, an optional client certificate. User/password travel in the URL
(``tls://user:password@host:4222``) and need nothing here."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats.errors

from esper.errors import ConfigError
from esper.settings import Settings

JWT_MARKER = b"BEGIN NATS USER JWT"
USER_SEED_PREFIX = b"SU"


@dataclass(frozen=True)
class NatsSecurity:
    """``creds``: ESPER_NATS_CREDS; ``tls_ca``/``tls_cert``/``tls_key``:
    ESPER_NATS_TLS_CA/_CERT/_KEY. All None: a plain (or URL-authenticated) link."""

    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsSecurity:
        return cls(settings.nats_creds, settings.nats_tls_ca, settings.nats_tls_cert,
                   settings.nats_tls_key)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats-py's ``connect``; ConfigError on a missing or
        unreadable file, named by its setting."""
        options: dict[str, Any] = {}
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        if self.creds is not None:
            data = _read(self.creds, "ESPER_NATS_CREDS")
            try:
                import nkeys  # noqa: F401  (nats-py imports it at connect time)
            except ImportError:
                raise ConfigError("ESPER_NATS_CREDS needs the nkeys package: "
                                  "pip install nkeys") from None
            if JWT_MARKER in data:
                options["user_credentials"] = str(self.creds)
            elif data.strip().startswith(USER_SEED_PREFIX):
                options["nkeys_seed"] = str(self.creds)
            else:
                raise ConfigError(f"ESPER_NATS_CREDS={self.creds} is neither a NATS .creds "
                                  "file nor a user nkey seed (SU…)")
        return options

    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context: the private CA if given (else the system's
        roots) and the client certificate if given; None when nothing is set
        (a ``tls://`` URL then uses the system's roots)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("ESPER_NATS_TLS_CERT and ESPER_NATS_TLS_KEY go together")
        if self.tls_ca is None and self.tls_cert is None:
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.tls_ca) if self.tls_ca is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ESPER_NATS_TLS_CA={self.tls_ca}: {exc}") from exc
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"ESPER_NATS_TLS_CERT/_KEY ({self.tls_cert}, "
                                  f"{self.tls_key}): {exc}") from exc
        return context


def _read(path: Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}={path}: {exc}") from exc


def refusal(exc: BaseException) -> str | None:
    """What to fix when ``exc`` means the server refused us for good (credentials,
    TLS trust); None when it may pass (the server is down, restarting, busy)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"its TLS certificate does not verify ({exc.verify_message}): set "
                "ESPER_NATS_TLS_CA to the CA that signed it")
    if isinstance(exc, ssl.SSLError) and "CERTIFICATE" in str(exc.reason or "").upper():
        return (f"TLS handshake refused ({exc.reason}): the server wants a client "
                "certificate: set ESPER_NATS_TLS_CERT and ESPER_NATS_TLS_KEY")
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in text:
        return ("wrong or missing credentials (Authorization Violation): check the "
                "user:password in ESPER_NATS_URL or the file in ESPER_NATS_CREDS")
    if "authentication expired" in text or "authentication revoked" in text:
        return f"credentials no longer accepted ({exc}): renew ESPER_NATS_CREDS"
    if isinstance(exc, nats.errors.SecureConnRequiredError) or "tls required" in text:
        return "the server requires TLS: use tls:// URLs and set ESPER_NATS_TLS_CA"
    if isinstance(exc, nats.errors.SecureConnWantedError):
        return "TLS was asked for but the server does not offer it"
    return None


def redact(url: str) -> str:
    """``url`` without its password (or token), for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable NATS URL>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    # A user alone before the @ is a token: hide it too.
    shown = f"{parts.username}:***" if password is not None else "***"
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))
