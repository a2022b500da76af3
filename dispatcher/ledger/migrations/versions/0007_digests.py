"""digests: a delivery may carry many appeals' letters

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-21 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("appeal_id", existing_type=sa.String(length=40), nullable=True)
        batch.add_column(sa.Column("kind", sa.String(length=8), nullable=False, server_default="letter"))
        batch.add_column(sa.Column("digest_id", sa.String(length=40), nullable=True))
        batch.create_index("ix_deliveries_digest_id", ["digest_id"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_digest_id")
        batch.drop_column("digest_id")
        batch.drop_column("kind")
        batch.alter_column("appeal_id", existing_type=sa.String(length=40), nullable=False)
