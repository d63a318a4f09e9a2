"""Initial schema: every table of esper.db.models and the kernel_history view.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here on purpose: a migration must not change when models.py does.
KERNEL_HISTORY = """
CREATE VIEW kernel_history AS
SELECT
    e.id             AS event_seq,
    e.kernel_id      AS kernel_id,
    k.blueprint_hash AS blueprint_hash,
    b.name           AS blueprint_name,
    e.event          AS event,
    e.status         AS status,
    k.status         AS kernel_status,
    k.target         AS target,
    k.backend        AS backend,
    k.dtype          AS dtype,
    k.cache_key      AS cache_key,
    e.correlation_id AS correlation_id,
    e.at             AS at,
    e.detail         AS detail
FROM kernel_events AS e
JOIN kernels AS k ON k.id = e.kernel_id
JOIN blueprints AS b ON b.hash = k.blueprint_hash
"""


def _now() -> sa.TextClause:
    return sa.text("now()")


def _at(name: str = "at") -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=_now(), nullable=False)


def _json(name: str, default: str) -> sa.Column:
    return sa.Column(name, JSONB(), server_default=default, nullable=False)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("cache_key", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("store", sa.String(200), nullable=False),
        sa.Column("manifest", JSONB(), nullable=False),
        _at("created_at"),
        sa.PrimaryKeyConstraint("digest", name="pk_artifacts"),
    )
    op.create_index("ix_artifacts_cache_key", "artifacts", ["cache_key"])

    op.create_table(
        "blueprints",
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("ir", JSONB(), nullable=False),
        _at("first_submitted_at"),
        _at("last_submitted_at"),
        sa.Column("submit_count", sa.Integer(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("hash", name="pk_blueprints"),
    )

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("stream_seq", sa.BigInteger(), nullable=True),
        _at(),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_stage", "dead_letters", ["stage"])
    op.create_index(
        "uq_dead_letters_stage_seq", "dead_letters", ["stage", "stream_seq"], unique=True
    )

    op.create_table(
        "inbox",
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        _at("processed_at"),
        sa.PrimaryKeyConstraint("stage", "event_id", name="pk_inbox"),
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        _at("created_at"),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index(
        "ix_outbox_unsent", "outbox", ["id"], postgresql_where=sa.text("sent_at IS NULL")
    )

    op.create_table(
        "seed_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("site", sa.String(100), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("kernel_cache_key", sa.String(64), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=False),
        _json("detail", "{}"),
        _at(),
        sa.PrimaryKeyConstraint("id", name="pk_seed_events"),
        sa.UniqueConstraint("event_id", name="uq_seed_events_event_id"),
    )
    op.create_index("ix_seed_events_run_id", "seed_events", ["run_id"])

    op.create_table(
        "kernels",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("blueprint_hash", sa.String(64), nullable=False),
        sa.Column("cache_key", sa.String(64), nullable=False),
        sa.Column("target", sa.String(32), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("artifact_digest", sa.String(64), nullable=True),
        _json("versions", "{}"),
        _json("timings", "{}"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        _at("created_at"),
        _at("updated_at"),
        sa.ForeignKeyConstraint(
            ["blueprint_hash"],
            ["blueprints.hash"],
            name="fk_kernels_blueprint_hash_blueprints",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_kernels"),
        sa.UniqueConstraint("cache_key", name="uq_kernels_cache_key"),
    )
    op.create_index("ix_kernels_blueprint_hash", "kernels", ["blueprint_hash"])
    op.create_index("ix_kernels_status", "kernels", ["status"])

    for table, columns in (
        (
            "deployments",
            [
                sa.Column("target", sa.String(32), nullable=False),
                _json("seed_schema", "{}"),
                sa.Column("artifact_location", sa.String(400), nullable=True),
                sa.Column("status", sa.String(16), server_default="active", nullable=False),
            ],
        ),
        (
            "kernel_events",
            [
                sa.Column("event", sa.String(32), nullable=False),
                sa.Column("status", sa.String(16), nullable=False),
                sa.Column("correlation_id", sa.String(64), nullable=True),
                _json("detail", "{}"),
            ],
        ),
        (
            "validations",
            [
                sa.Column("device", sa.String(64), nullable=False),
                sa.Column("passed", sa.Boolean(), nullable=False),
                _json("checks", "[]"),
                _json("reasons", "[]"),
                sa.Column("duration_ms", sa.Float(), nullable=True),
            ],
        ),
    ):
        # The three per-kernel tables share their id, kernel FK and timestamp.
        op.create_table(
            table,
            sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
            sa.Column("kernel_id", sa.UUID(), nullable=False),
            *columns,
            _at(),
            sa.ForeignKeyConstraint(
                ["kernel_id"],
                ["kernels.id"],
                name=f"fk_{table}_kernel_id_kernels",
                ondelete="CASCADE",
            ),
            sa.PrimaryKeyConstraint("id", name=f"pk_{table}"),
        )
        op.create_index(f"ix_{table}_kernel_id", table, ["kernel_id"])

    op.execute(KERNEL_HISTORY)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS kernel_history")
    # Children before parents; dropping a table drops its indexes.
    for table in (
        "validations",
        "kernel_events",
        "deployments",
        "kernels",
        "seed_events",
        "outbox",
        "inbox",
        "dead_letters",
        "blueprints",
        "artifacts",
    ):
        op.drop_table(table)
