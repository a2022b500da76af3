"""The pacer's and the reconciler's questions to the ledger: who has letters due, one recipient's
backlog, messages lost on the way, the supporters a digest carries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, func, or_, select, tuple_

from dispatcher.ledger.engine import reading
from dispatcher.ledger.states import IN_HAND, State
from dispatcher.ledger.tables import AP, D
from dispatcher.ledger.views import SupporterData

#: asked by intake once per appeal: built once, the lists bound as expanding parameters (a
#: statement built per call costs more in SQLAlchemy than the query in the database)
_BACKLOG = (
    select(D.c.channel, D.c.recipient)
    .where(
        tuple_(D.c.channel, D.c.recipient).in_(bindparam("p_pairs", expanding=True)),
        D.c.state == State.PLANNED,
    )
    .distinct()
)


def _planned_due(now: datetime, fresh_grace: timedelta) -> Any:
    """Planned and due; a new row is left to intake's own enqueue for ``fresh_grace``, so the
    two do not both send it."""
    return and_(
        D.c.state == State.PLANNED,
        D.c.next_attempt_at <= now,
        or_(D.c.attempts > 0, D.c.updated_at <= now - fresh_grace),
    )


@dataclass(frozen=True)
class DueRecipient:
    channel: str
    recipient: str
    count: int
    #: the route of one of its letters
    campaign: str
    section: str
    target: str


@dataclass(frozen=True)
class RecipientBacklog:
    #: planned letters (rows with id, campaign, section, target, next_attempt_at, created_at,
    #: updated_at, attempts, kind, language), oldest first
    planned: list[Any]
    #: when letters were released, oldest first: recent sends and the latest one, and letters on
    #: their way
    released: list[datetime]


@dataclass(frozen=True)
class AwaitingReport:
    """A letter its channel accepted and whose final word (a webhook) has not come."""

    id: str
    channel: str
    section: str
    remote_id: str | None
    sent_at: datetime | None


class Schedule:
    def __init__(self, engine: Engine):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)

    def due_recipients(self, now: datetime, *, fresh_grace: timedelta) -> list[DueRecipient]:
        """Every recipient with planned letters due now, with how many, and one of its letters'
        route (the catalog gives its caps and office hours)."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(
                    D.c.channel,
                    D.c.recipient,
                    func.count(),
                    func.min(D.c.campaign),
                    func.min(D.c.section),
                    func.min(D.c.target),
                )
                .where(_planned_due(now, fresh_grace))
                .group_by(D.c.channel, D.c.recipient)
            ).all()
        return [DueRecipient(*row) for row in rows]

    def due_for(self, channel: str, recipient: str, now: datetime, *, fresh_grace: timedelta, limit: int) -> list[str]:
        """One recipient's planned letters due now, oldest due first."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(D.c.id)
                .where(D.c.channel == channel, D.c.recipient == recipient, _planned_due(now, fresh_grace))
                .order_by(D.c.next_attempt_at, D.c.created_at)
                .limit(limit)
            ).all()
        return [r.id for r in rows]

    def lost_messages(self, now: datetime, *, requeue_after: timedelta, limit: int) -> list[str]:
        """Queued letters nobody claimed for ``requeue_after``: their message was lost (Redis
        restarted without its data, a message expired). A second message is harmless: the claim
        lets only one through."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(D.c.id)
                .where(D.c.state == State.QUEUED, D.c.updated_at <= now - requeue_after)
                .order_by(D.c.updated_at)
                .limit(limit)
            ).all()
        return [r.id for r in rows]

    def recipient_backlog(self, channel: str, recipient: str, now: datetime, window: timedelta) -> RecipientBacklog:
        """What the pacer needs to plan one recipient: its waiting letters (every campaign and
        section), the letters on their way (queued or being sent) and its recent sends."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(
                    D.c.id,
                    D.c.state,
                    D.c.campaign,
                    D.c.section,
                    D.c.target,
                    D.c.next_attempt_at,
                    D.c.created_at,
                    D.c.updated_at,
                    D.c.attempts,
                    D.c.kind,
                    D.c.language,
                )
                .where(D.c.channel == channel, D.c.recipient == recipient, D.c.state.in_(IN_HAND))
                .order_by(D.c.created_at, D.c.id)
            ).all()
            # A digest's letters carry its sent_at too; only the digest itself went down the line.
            mine = and_(D.c.channel == channel, D.c.recipient == recipient, D.c.digest_id.is_(None))
            sent = (
                conn.execute(select(D.c.sent_at).where(mine, D.c.sent_at >= now - window).order_by(D.c.sent_at))
                .scalars()
                .all()
            )
            latest = conn.execute(select(func.max(D.c.sent_at)).where(mine)).scalar_one_or_none()
        planned = [r for r in rows if r.state == State.PLANNED]
        # The latest send sets the pace even when it is older than the window. Letters on their
        # way count as released when they were queued or claimed.
        older = [latest] if latest is not None and (not sent or latest < sent[0]) else []
        released = sorted([*older, *sent, *(r.updated_at for r in rows if r.state != State.PLANNED)])
        return RecipientBacklog(planned=planned, released=released)

    def has_backlog(self, pairs: Sequence[tuple[str, str]], *, conn: Connection | None = None) -> set[tuple[str, str]]:
        """Of these (channel, recipient) pairs, those with letters held in the ledger (planned:
        deferred by a cap, waiting for a retry or for the pacer); within ``conn``'s transaction
        when given."""
        if not pairs:
            return set()
        params = {"p_pairs": list(pairs)}
        if conn is not None:
            rows = conn.execute(_BACKLOG, params).all()
        else:
            with self.reads.connect() as c:
                rows = c.execute(_BACKLOG, params).all()
        return {(r.channel, r.recipient) for r in rows}

    def digest_signers(self, digest_id: str) -> list[SupporterData]:
        """The supporters whose letters a digest carries, in the order they signed."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(
                    AP.c.supporter_name,
                    AP.c.supporter_email,
                    AP.c.supporter_city,
                    AP.c.supporter_country,
                    AP.c.supporter_ref,
                )
                .join(D, D.c.appeal_id == AP.c.id)
                .where(D.c.digest_id == digest_id, D.c.state == State.BUNDLED, AP.c.supporter_name.is_not(None))
                .order_by(AP.c.created_at, AP.c.id)
            ).all()
        return [
            SupporterData(
                name=r.supporter_name,
                email=r.supporter_email or "",
                city=r.supporter_city,
                country=r.supporter_country,
                languages=(),
                message=None,
                supporter_ref=r.supporter_ref,
            )
            for r in rows
        ]

    def awaiting_reports(self, channels: Sequence[str], sent_before: datetime, limit: int) -> list[AwaitingReport]:
        """Letters of ``channels`` still ``sent`` since before ``sent_before``: their channel
        accepted them and its final report has not come (lost, or late)."""
        if not channels:
            return []
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(D.c.id, D.c.channel, D.c.section, D.c.remote_id, D.c.sent_at)
                .where(D.c.state == State.SENT, D.c.channel.in_(list(channels)), D.c.sent_at <= sent_before)
                .order_by(D.c.sent_at)
                .limit(limit)
            ).all()
        return [AwaitingReport(r.id, r.channel, r.section, r.remote_id, r.sent_at) for r in rows]
