"""an index for the pacer's per-recipient questions

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-21 08:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_delivery_recipient", "deliveries", ["recipient", "channel", "state"])


def downgrade() -> None:
    op.drop_index("ix_delivery_recipient", table_name="deliveries")
