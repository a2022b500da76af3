"""initial ledger: appeals, deliveries, attempts, used signatures

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-21 05:11:15.612519
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import dispatcher.ledger.models

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "appeals",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("section", sa.String(length=8), nullable=False),
        sa.Column("language", sa.String(length=3), nullable=False),
        sa.Column("client_ref", sa.String(length=128), nullable=True),
        sa.Column("supporter_ref", sa.String(length=64), nullable=False),
        sa.Column("created_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.Column("supporter_name", sa.String(length=200), nullable=True),
        sa.Column("supporter_email", sa.String(length=320), nullable=True),
        sa.Column("supporter_city", sa.String(length=100), nullable=True),
        sa.Column("supporter_country", sa.String(length=2), nullable=True),
        sa.Column("supporter_languages", sa.String(length=64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("pii_purged_at", dispatcher.ledger.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("campaign", "section", "supporter_ref", name="uq_appeal_supporter"),
        sa.UniqueConstraint("section", "client_ref", name="uq_appeal_client_ref"),
    )
    with op.batch_alter_table("appeals", schema=None) as batch_op:
        batch_op.create_index("ix_appeal_campaign_section", ["campaign", "section"], unique=False)

    op.create_table(
        "used_signatures",
        sa.Column("signature", sa.String(length=64), nullable=False),
        sa.Column("section", sa.String(length=8), nullable=False),
        sa.Column("seen_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("signature"),
    )
    with op.batch_alter_table("used_signatures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_used_signatures_seen_at"), ["seen_at"], unique=False)

    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("appeal_id", sa.String(length=40), nullable=False),
        sa.Column("campaign", sa.String(length=64), nullable=False),
        sa.Column("section", sa.String(length=8), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("language", sa.String(length=3), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("claimed_by", sa.String(length=80), nullable=True),
        sa.Column("claimed_at", dispatcher.ledger.models.UTCDateTime(), nullable=True),
        sa.Column("created_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.Column("queued_at", dispatcher.ledger.models.UTCDateTime(), nullable=True),
        sa.Column("sent_at", dispatcher.ledger.models.UTCDateTime(), nullable=True),
        sa.Column("delivered_at", dispatcher.ledger.models.UTCDateTime(), nullable=True),
        sa.Column("last_outcome", sa.String(length=16), nullable=True),
        sa.Column("last_code", sa.String(length=16), nullable=True),
        sa.Column("last_text", sa.Text(), nullable=True),
        sa.Column("remote_id", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(["appeal_id"], ["appeals.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("appeal_id", "target", "channel", name="uq_delivery_route"),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_delivery_appeal", ["appeal_id"], unique=False)
        batch_op.create_index("ix_delivery_campaign_state", ["campaign", "section", "state"], unique=False)
        batch_op.create_index("ix_delivery_due", ["state", "next_attempt_at"], unique=False)

    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", dispatcher.ledger.models.UTCDateTime(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(length=16), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=80), nullable=True),
        sa.ForeignKeyConstraint(["delivery_id"], ["deliveries.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_attempts_delivery_id"), ["delivery_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_attempts_delivery_id"))

    op.drop_table("attempts")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_delivery_due")
        batch_op.drop_index("ix_delivery_campaign_state")
        batch_op.drop_index("ix_delivery_appeal")

    op.drop_table("deliveries")
    with op.batch_alter_table("used_signatures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_used_signatures_seen_at"))

    op.drop_table("used_signatures")
    with op.batch_alter_table("appeals", schema=None) as batch_op:
        batch_op.drop_index("ix_appeal_campaign_section")

    op.drop_table("appeals")
