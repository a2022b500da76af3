"""fax facts and flagged numbers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 05:32:00.633784
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dispatcher.ledger.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "flagged_numbers",
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=True),
        sa.Column("flagged_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("number"),
    )
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("remote_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("pages", sa.Integer(), nullable=True))

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gateway", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("pages", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("line_seconds", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("line_seconds")
        batch_op.drop_column("pages")
        batch_op.drop_column("gateway")

    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("pages")
        batch_op.drop_column("remote_id")

    op.drop_table("flagged_numbers")
