"""What the inline-literal helpers refuse, and when the runtime's inline claim
steps aside (the integration tests read the literals back from PostgreSQL)."""

from __future__ import annotations

import uuid

import pytest

from esper.workers import inbox, sqltext


def test_values_no_literal_can_carry_are_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        sqltext.text_literal("a\x00b")
    with pytest.raises(TypeError):
        sqltext.uuid_literal("00000000-0000-0000-0000-000000000000")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sqltext.text_literal(b"bytes")  # type: ignore[arg-type]


def test_the_inline_claim_steps_aside_where_it_cannot_serve() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    sql = inbox.claim_literal("validate", [(a, "esper.kernel.compiled"), (b, "x'y")])
    assert sql is not None and sql.startswith("INSERT INTO inbox") and "ON CONFLICT" not in sql
    assert str(a) in sql and "E'x''y'" in sql
    assert inbox.claim_literal("validate", []) is None
    assert inbox.claim_literal("validate", [(a, "s"), (a, "s")]) is None  # twice in one group
    assert inbox.claim_literal("validate", [(a, "bad\x00subject")]) is None
