"""dead letters

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 08:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dispatcher.ledger.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=True),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("failed_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.Column("recorded_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("message_id"),
    )
    op.create_index("ix_dead_letters_delivery_id", "dead_letters", ["delivery_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_delivery_id", table_name="dead_letters")
    op.drop_table("dead_letters")
