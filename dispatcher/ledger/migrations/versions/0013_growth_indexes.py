"""indexes for a ledger that grows every campaign: a recipient's sends, sent letters by channel,
letters by creation time, appeals not yet purged

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 15:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_delivery_recipient_sent", "deliveries", ["channel", "recipient", "sent_at", "digest_id"])
    op.create_index("ix_delivery_state_channel", "deliveries", ["state", "channel"])
    op.create_index("ix_delivery_created", "deliveries", ["created_at"])
    op.create_index("ix_appeal_unpurged", "appeals", ["pii_purged_at", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_appeal_unpurged", table_name="appeals")
    op.drop_index("ix_delivery_created", table_name="deliveries")
    op.drop_index("ix_delivery_state_channel", table_name="deliveries")
    op.drop_index("ix_delivery_recipient_sent", table_name="deliveries")
