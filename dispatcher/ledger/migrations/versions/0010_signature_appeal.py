"""used signatures: the appeal each was answered with (a double submit gets the original back)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-20 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("used_signatures") as batch:
        batch.add_column(sa.Column("appeal_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("used_signatures") as batch:
        batch.drop_column("appeal_id")
