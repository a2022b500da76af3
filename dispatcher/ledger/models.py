"""Ledger tables: appeals, deliveries (one per appeal × target × channel), attempts.

The ledger is the source of truth and the outbox: intake writes an appeal and its planned
deliveries in one transaction; everything that later happens to a letter is a state change
on its delivery row plus one attempt row per try.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Every state and its groupings are declared once, in states.py: re-exported for the modules
# that know a letter only as a row.
from dispatcher.ledger.states import LETTER_OUT as LETTER_OUT
from dispatcher.ledger.states import PENDING as PENDING
from dispatcher.ledger.states import TERMINAL as TERMINAL
from dispatcher.ledger.states import WAITING as WAITING
from dispatcher.ledger.states import State as State


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite has no time zones and returns naive values)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger; use aware UTC datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Appeal(Base):
    __tablename__ = "appeals"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    campaign: Mapped[str] = mapped_column(String(64))
    section: Mapped[str] = mapped_column(String(8))
    language: Mapped[str] = mapped_column(String(3))
    client_ref: Mapped[str | None] = mapped_column(String(128))
    #: keyed hash of the supporter's email: finds duplicates and names the supporter in logs
    supporter_ref: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Personal data below: set to NULL by the retention purge and by an erasure.
    supporter_name: Mapped[str | None] = mapped_column(String(200))
    supporter_email: Mapped[str | None] = mapped_column(String(320))
    supporter_city: Mapped[str | None] = mapped_column(String(100))
    supporter_country: Mapped[str | None] = mapped_column(String(2))
    #: space-separated language codes the supporter declared besides the appeal's language
    supporter_languages: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    pii_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: when the supporter's data was erased on request (GDPR art. 17; docs/privacy.md): the row
    #: stays, blank, for the anonymous counts; its letters not yet sent are cancelled
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        UniqueConstraint("campaign", "section", "supporter_ref", name="uq_appeal_supporter"),
        UniqueConstraint("section", "client_ref", name="uq_appeal_client_ref"),
        Index("ix_appeal_campaign_section", "campaign", "section"),
        # the retention purge's candidates: appeals not yet blanked, oldest first
        Index("ix_appeal_unpurged", "pii_purged_at", "created_at"),
    )


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    #: None for a digest, which carries the letters of many appeals
    appeal_id: Mapped[str | None] = mapped_column(ForeignKey("appeals.id", ondelete="CASCADE"))
    #: "letter" (one supporter's) or "digest" (one letter with the list of supporters, sent when
    #: a recipient's line cannot carry every letter before the deadline; docs/digests.md)
    kind: Mapped[str] = mapped_column(String(8), default="letter", server_default="letter")
    #: for a letter bundled into a digest, the digest's delivery id
    digest_id: Mapped[str | None] = mapped_column(String(40), index=True)
    campaign: Mapped[str] = mapped_column(String(64))
    section: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    #: the target's real address (email or E.164 fax) at planning time; sandbox mode
    #: still routes the letter to a local sink
    recipient: Mapped[str] = mapped_column(String(320))
    language: Mapped[str] = mapped_column(String(3))
    state: Mapped[str] = mapped_column(String(16), default=State.PLANNED)
    #: tries that count towards the retry cap (deferrals and operational pauses do not)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: the stable key every send carries (email Message-ID, gateway tag)
    message_id: Mapped[str] = mapped_column(String(255))
    claimed_by: Mapped[str | None] = mapped_column(String(80))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_outcome: Mapped[str | None] = mapped_column(String(16))
    last_code: Mapped[str | None] = mapped_column(String(16))
    last_text: Mapped[str | None] = mapped_column(Text)
    remote_id: Mapped[str | None] = mapped_column(String(128))
    # Fax facts for operators: which gateway carried the letter, its pages and line time.
    gateway: Mapped[str | None] = mapped_column(String(32))
    pages: Mapped[int | None] = mapped_column(Integer)
    line_seconds: Mapped[float | None] = mapped_column(Float)
    #: the letter this one stands in for: planned again on a route's fallback channel after the
    #: other's address bounced or was known to bounce (docs/email.md, "Fallback")
    replaces: Mapped[str | None] = mapped_column(String(40), index=True)

    __table_args__ = (
        UniqueConstraint("appeal_id", "target", "channel", name="uq_delivery_route"),
        Index("ix_delivery_due", "state", "next_attempt_at"),
        Index("ix_delivery_appeal", "appeal_id"),
        Index("ix_delivery_campaign_state", "campaign", "section", "state"),
        # the pacer's and intake's questions about one recipient (its backlog, its recent sends)
        Index("ix_delivery_recipient", "recipient", "channel", "state"),
        # a recipient's sends in order (the pacer's window and latest send), answered from the
        # index alone: with a million sent letters the table scan took 0.6 s per recipient
        Index("ix_delivery_recipient_sent", "channel", "recipient", "sent_at", "digest_id"),
        # the sent letters of the channels that wait for a report (fax), among a million sent emails
        Index("ix_delivery_state_channel", "state", "channel"),
        # the console's letter search by time range, newest first
        Index("ix_delivery_created", "created_at"),
    )


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(80))
    #: the gateway's id of the fax (or the relay's queue id) this try produced
    remote_id: Mapped[str | None] = mapped_column(String(128))
    pages: Mapped[int | None] = mapped_column(Integer)


class UsedSignature(Base):
    """Intake signatures already accepted. The HMAC covers timestamp and body, so the same
    signature again is the same request sent twice (a double click): it is answered with the
    appeal it was accepted for, and never creates another."""

    __tablename__ = "used_signatures"

    signature: Mapped[str] = mapped_column(String(64), primary_key=True)
    section: Mapped[str] = mapped_column(String(8))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    #: the appeal the signed request was answered with (NULL for rows older than 0010: such a
    #: replay is refused, as it was then). No foreign key: the row is forgotten within the hour.
    appeal_id: Mapped[str | None] = mapped_column(String(40))


class FlaggedNumber(Base):
    """A fax number that answers but is no fax machine: letters to it wait for an operator."""

    __tablename__ = "flagged_numbers"

    number: Mapped[str] = mapped_column(String(32), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    delivery_id: Mapped[str | None] = mapped_column(String(40))
    flagged_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PausedChannel(Base):
    """A channel of a section ("email:us", "fax:ch") paused after an operational error, such as a
    relay refusing our credentials: its letters wait, none fail, until an operator resumes it."""

    __tablename__ = "paused_channels"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    paused_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CampaignClosure(Base):
    """A campaign closed early by an operator (the case was resolved, the detainee released)."""

    __tablename__ = "campaign_closures"

    campaign: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    closed_at: Mapped[datetime] = mapped_column(UTCDateTime())


def utcnow() -> datetime:
    return datetime.now(UTC)


class DeadLetter(Base):
    """A queue message dramatiq gave up on (its actor crashed on every retry). Recorded here
    because Redis deletes dead-lettered messages after a while; the delivery itself stays in
    the ledger either way and the reconciler sends it again."""

    __tablename__ = "dead_letters"

    #: dramatiq's message id
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    delivery_id: Mapped[str | None] = mapped_column(String(40), index=True)
    queue: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(64))
    #: the last exception's type and text, as dramatiq kept it (no personal data: the actor
    #: only ever gets a delivery id)
    reason: Mapped[str | None] = mapped_column(Text)
    failed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EarlyReport(Base):
    """A channel's final word on a letter that came before the letter's send was recorded (a
    gateway's webhook overtaking its own create answer). Kept, and applied once the send is
    recorded: the gateway sends it only once. ``report`` is the report as JSON (no personal
    data: ids, status, the provider's reason)."""

    __tablename__ = "early_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(40), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    remote_id: Mapped[str] = mapped_column(String(128))
    report: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Suppression(Base):
    """An address a channel no longer sends to, shared by every campaign and section: it bounced
    for good (or soft-bounced too often). An official's address, not personal data."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    #: lower-cased
    address: Mapped[str] = mapped_column(String(320))
    #: "bounced" (a hard bounce), "soft_bounces" (too many soft ones), "rejected" (refused at
    #: RCPT/DATA), "operator"
    reason: Mapped[str] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(16))
    text: Mapped[str | None] = mapped_column(Text)
    #: the letter whose bounce put it here
    delivery_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (UniqueConstraint("channel", "address", name="uq_suppression_address"),)


class BounceFact(Base):
    """What a bounce or an auto-reply said about one letter, and nothing else of it: the facts an
    operator needs (status, diagnostic, reporting MTA, time). The message itself is not kept."""

    __tablename__ = "bounces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(40), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    #: the official's address the letter went to (lower-cased)
    address: Mapped[str] = mapped_column(String(320))
    #: hard, soft, delayed, auto_reply
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    diagnostic: Mapped[str | None] = mapped_column(Text)
    reporting_mta: Mapped[str | None] = mapped_column(String(255))
    #: when the reporting MTA says it happened, if it says
    arrived_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_bounces_address", "channel", "address", "kind", "received_at"),)


class Operator(Base):
    """A person who works the console: a viewer reads, an operator acts on its sections' letters
    and channels, an admin acts on everything (docs/console.md)."""

    __tablename__ = "operators"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: viewer, operator, admin
    role: Mapped[str] = mapped_column(String(16))
    #: space-separated section codes; empty for every section (an admin's, or an all-sections viewer)
    sections: Mapped[str] = mapped_column(String(256), default="", server_default="")
    #: argon2id, in its PHC string form
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OperatorSession(Base):
    """A logged-in console session. The cookie carries a random token; only its SHA-256 is kept,
    so a copy of the ledger logs nobody in."""

    __tablename__ = "operator_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    operator: Mapped[str] = mapped_column(ForeignKey("operators.name", ondelete="CASCADE"), index=True)
    #: the session's CSRF token, sent back in every form
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """One operator action: who, when, what, on what, why. Written in the same transaction as the
    action; nothing edits or deletes it (the console only shows it)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    #: an operator's name, or "cli:<user>" / "api:<section>" for actions from elsewhere
    actor: Mapped[str] = mapped_column(String(80))
    #: e.g. letter.retry, letter.cancel, channel.resume, campaign.close, supporter.erase
    action: Mapped[str] = mapped_column(String(40))
    #: letter, appeal, campaign, channel, number, supporter, operator
    target_kind: Mapped[str] = mapped_column(String(16))
    #: never personal data: a delivery/appeal id, a campaign id, a channel key, a keyed hash
    target_id: Mapped[str] = mapped_column(String(128))
    #: the section the target belongs to, for scoping the log; None for cross-section actions
    section: Mapped[str | None] = mapped_column(String(8), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    #: a short outcome, e.g. "3 letters cancelled"
    detail: Mapped[str | None] = mapped_column(Text)
