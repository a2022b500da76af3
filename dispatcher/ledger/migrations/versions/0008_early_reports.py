"""early reports: a channel's final word that came before its send was recorded

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dispatcher.ledger.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "early_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("remote_id", sa.String(length=128), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
        sa.Column("received_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_early_reports_delivery_id", "early_reports", ["delivery_id"])


def downgrade() -> None:
    op.drop_index("ix_early_reports_delivery_id", table_name="early_reports")
    op.drop_table("early_reports")
