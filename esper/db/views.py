"""SQL views as query constructs. Migrations create the views; these lightweight
``table()`` objects belong to no MetaData, so ``create_all`` and autogenerate
never touch them."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

# One row per kernel lifecycle event (kernel_events ⋈ kernels ⋈ blueprints).
kernel_history = sa.table(
    "kernel_history",
    sa.column("event_seq", sa.BigInteger()),
    sa.column("kernel_id", sa.Uuid()),
    sa.column("blueprint_hash", sa.String()),
    sa.column("blueprint_name", sa.String()),
    sa.column("event", sa.String()),
    sa.column("status", sa.String()),
    sa.column("kernel_status", sa.String()),
    sa.column("target", sa.String()),
    sa.column("backend", sa.String()),
    sa.column("dtype", sa.String()),
    sa.column("cache_key", sa.String()),
    sa.column("correlation_id", sa.String()),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("detail", JSONB()),
)
