"""bounces: suppressed addresses, the facts of each bounce, and a letter's fallback link

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dispatcher.ledger.models

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("delivery_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("channel", "address", name="uq_suppression_address"),
    )
    op.create_table(
        "bounces",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("diagnostic", sa.Text(), nullable=True),
        sa.Column("reporting_mta", sa.String(length=255), nullable=True),
        sa.Column("arrived_at", dispatcher.ledger.models.UTCDateTime(), nullable=True),
        sa.Column("received_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_bounces_delivery_id", "bounces", ["delivery_id"])
    op.create_index("ix_bounces_address", "bounces", ["channel", "address", "kind", "received_at"])
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("replaces", sa.String(length=40), nullable=True))
        batch.create_index("ix_deliveries_replaces", ["replaces"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_replaces")
        batch.drop_column("replaces")
    op.drop_index("ix_bounces_address", table_name="bounces")
    op.drop_index("ix_bounces_delivery_id", table_name="bounces")
    op.drop_table("bounces")
    op.drop_table("suppressions")
