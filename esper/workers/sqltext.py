"""SQL literals for the statements the runtime sends inline (simple query
protocol), so that one round trip can carry several statements: BEGIN with the
inbox claim, the outbox rows with COMMIT (see esper.workers.txn). asyncpg
sends parameters only one statement per round trip; on a 2-vCPU machine each
round trip wakes two processes, which cost more CPU than the statement.

Each literal is built from a value of a checked type and quoted so that it
reads the same whatever ``standard_conforming_strings`` is."""

from __future__ import annotations

import uuid

__all__ = ["bytea_literal", "text_literal", "uuid_literal"]


def uuid_literal(value: uuid.UUID) -> str:
    if not isinstance(value, uuid.UUID):
        raise TypeError(f"expected a UUID, got {type(value).__name__}")
    return f"'{value}'::uuid"  # str(UUID): hex digits and dashes only


def text_literal(value: str) -> str:
    """An escape-string literal (E'...'): backslashes and quotes doubled."""
    if not isinstance(value, str):
        raise TypeError(f"expected a str, got {type(value).__name__}")
    if "\x00" in value:
        raise ValueError("a PostgreSQL text value cannot hold a NUL character")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def bytea_literal(value: bytes) -> str:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return f"decode('{bytes(value).hex()}','hex')"
