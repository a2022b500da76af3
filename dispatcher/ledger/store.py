"""Ledger operations. The worker's hot path (claim, finish) uses Core statements, not the ORM:
two small statements per letter instead of object loading and flushing.

Every state change is a compare-and-set on the row's current state, so a redelivered queue
message, a second worker or a reconciler racing a worker can never move a letter twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Engine,
    Table,
    and_,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from dispatcher.ledger.models import (
    FINAL,
    LETTER_OUT,
    PENDING,
    WAITING,
    Appeal,
    Attempt,
    CampaignClosure,
    Delivery,
    FlaggedNumber,
    PausedChannel,
    State,
    UsedSignature,
)

# Core handles on the mapped tables, for the hot-path statements.
D = cast(Table, Delivery.__table__)
A = cast(Table, Attempt.__table__)
AP = cast(Table, Appeal.__table__)
FN = cast(Table, FlaggedNumber.__table__)
PC = cast(Table, PausedChannel.__table__)
CC = cast(Table, CampaignClosure.__table__)


#: letters not yet out: waiting in the ledger, on the queue, or in a worker's hands
IN_HAND = (State.PLANNED, State.QUEUED, State.SENDING)


def _planned_due(now: datetime, fresh_grace: timedelta) -> Any:
    """Planned and due; a new row is left to intake's own enqueue for ``fresh_grace``, so the
    two do not both send it."""
    return and_(
        D.c.state == State.PLANNED,
        D.c.next_attempt_at <= now,
        or_(D.c.attempts > 0, D.c.updated_at <= now - fresh_grace),
    )


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Several worker threads and an API share one file: WAL lets readers run beside the
        # writer, busy_timeout makes writers queue instead of failing with "database is locked".
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (below), not the sqlite3 module.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            # A deferred transaction that reads and then writes (intake: check for duplicates, then
            # insert) fails at once with "database is locked" when another process wrote in
            # between; the busy timeout never applies to that upgrade. Taking the write lock up
            # front makes writers from several processes queue instead.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
    return create_engine(url, poolclass=NullPool)


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it sends one letter."""

    id: str
    #: None for a digest
    appeal_id: str | None
    campaign: str
    section: str
    target: str
    channel: str
    recipient: str
    language: str
    message_id: str
    attempt: int
    queued_at: datetime | None
    created_at: datetime | None = None
    #: "letter" or "digest"
    kind: str = "letter"


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
class DigestRoute:
    """Where a digest goes: one target of one section's campaign, by one channel, in one language."""

    campaign: str
    section: str
    target: str
    channel: str
    recipient: str
    language: str
    #: the section sender's domain, for the digest's Message-ID
    domain: str


@dataclass(frozen=True)
class SupporterData:
    name: str
    email: str
    city: str | None
    country: str | None
    languages: tuple[str, ...]
    message: str | None
    supporter_ref: str


class Ledger:
    def __init__(self, url: str, engine: Engine | None = None):
        self.url = url
        self.engine = engine or make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def migrate(self) -> None:
        from dispatcher.ledger.migrate import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ the worker's path

    def claim(self, delivery_id: str, worker: str, now: datetime) -> Claim | None:
        """Take a waiting, due delivery for sending; None if it is not ours to send."""
        # One statement: UPDATE ... RETURNING (SQLite >= 3.35, PostgreSQL) on the worker's hot path.
        with self.engine.begin() as conn:
            row = conn.execute(
                update(D)
                .where(
                    D.c.id == delivery_id,
                    # A queued letter was released already: no second guess with this worker's
                    # clock, which may run behind the releasing machine's. A planned one (a retry,
                    # a deferral) must be due.
                    or_(D.c.state == State.QUEUED, and_(D.c.state == State.PLANNED, D.c.next_attempt_at <= now)),
                )
                .values(
                    state=State.SENDING,
                    claimed_by=worker,
                    claimed_at=now,
                    attempts=D.c.attempts + 1,
                    updated_at=now,
                )
                .returning(
                    D.c.id,
                    D.c.appeal_id,
                    D.c.campaign,
                    D.c.section,
                    D.c.target,
                    D.c.channel,
                    D.c.recipient,
                    D.c.language,
                    D.c.message_id,
                    D.c.attempts,
                    D.c.queued_at,
                    D.c.created_at,
                    D.c.kind,
                )
            ).one_or_none()
        if row is None:
            return None
        return Claim(
            id=row.id,
            appeal_id=row.appeal_id,
            campaign=row.campaign,
            section=row.section,
            target=row.target,
            channel=row.channel,
            recipient=row.recipient,
            language=row.language,
            message_id=row.message_id,
            attempt=row.attempts,
            queued_at=row.queued_at,
            created_at=row.created_at,
            kind=row.kind,
        )

    def state_of(self, delivery_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(D.c.state).where(D.c.id == delivery_id)).scalar_one_or_none()

    def supporter(self, appeal_id: str) -> SupporterData | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    AP.c.supporter_name,
                    AP.c.supporter_email,
                    AP.c.supporter_city,
                    AP.c.supporter_country,
                    AP.c.supporter_languages,
                    AP.c.message,
                    AP.c.supporter_ref,
                ).where(AP.c.id == appeal_id)
            ).one_or_none()
        if row is None or row.supporter_name is None or row.supporter_email is None:
            return None
        return SupporterData(
            name=row.supporter_name,
            email=row.supporter_email,
            city=row.supporter_city,
            country=row.supporter_country,
            languages=tuple((row.supporter_languages or "").split()),
            message=row.message,
            supporter_ref=row.supporter_ref,
        )

    def finish(
        self,
        claim: Claim,
        *,
        worker: str,
        state: State,
        outcome: str,
        started_at: datetime,
        now: datetime,
        code: int | str | None = None,
        text: str | None = None,
        next_attempt_at: datetime | None = None,
        remote_id: str | None = None,
        counts_as_try: bool = True,
        gateway: str | None = None,
        pages: int | None = None,
        line_seconds: float | None = None,
    ) -> bool:
        """Record one attempt and move the delivery out of 'sending'.

        Returns False when the claim was no longer ours (a reconciler took it back after the
        claim went stale); the attempt is still recorded, because it happened.
        """
        values: dict[str, Any] = {
            "state": state,
            "claimed_by": None,
            "claimed_at": None,
            "updated_at": now,
            "last_outcome": outcome,
            "last_code": None if code is None else str(code),
            "last_text": text,
        }
        if state in (State.SENT, State.DELIVERED):
            values["sent_at"] = now
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        for key, value in (("remote_id", remote_id), ("gateway", gateway), ("pages", pages)):
            if value is not None:
                values[key] = value
        if line_seconds is not None:
            values["line_seconds"] = line_seconds
        if state == State.DELIVERED:
            values["delivered_at"] = now
        if not counts_as_try:
            values["attempts"] = D.c.attempts - 1
        with self.engine.begin() as conn:
            # A deferral is not a try (the letter was held back by our own policy): no attempt row.
            if outcome != "deferred":
                conn.execute(
                    insert(A).values(
                        delivery_id=claim.id,
                        number=claim.attempt,
                        started_at=started_at,
                        duration_ms=(now - started_at).total_seconds() * 1000.0,
                        outcome=outcome,
                        code=values["last_code"],
                        text=text,
                        worker=worker,
                        remote_id=remote_id,
                        pages=pages,
                    )
                )
            moved = conn.execute(
                update(D)
                .where(D.c.id == claim.id, D.c.state == State.SENDING, D.c.claimed_by == worker)
                .values(**values)
            ).rowcount
            if moved and claim.kind == "digest":
                _mirror_digest(conn, claim.id, state, values)
        return moved == 1

    # ------------------------------------------------------------------ gateway reports

    def fax_of(self, delivery_id: str) -> Any | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(
                    D.c.id,
                    D.c.state,
                    D.c.remote_id,
                    D.c.recipient,
                    D.c.attempts,
                    D.c.campaign,
                    D.c.section,
                    D.c.created_at,
                ).where(D.c.id == delivery_id, D.c.channel == "fax")
            ).one_or_none()

    def settle_fax(
        self,
        delivery_id: str,
        remote_id: str,
        *,
        state: State,
        outcome: str,
        now: datetime,
        code: int | str | None = None,
        text: str | None = None,
        next_attempt_at: datetime | None = None,
        pages: int | None = None,
        line_seconds: float | None = None,
    ) -> bool:
        """Apply a gateway's final word on a fax it accepted earlier.

        Only a delivery still ``sent`` with this very fax as its remote id moves, so a duplicate
        webhook, a late one for an older try, or one arriving after another final one changes
        nothing. The try's attempt row gets the final outcome.
        """
        values: dict[str, Any] = {
            "state": state,
            "updated_at": now,
            "last_outcome": outcome,
            "last_code": None if code is None else str(code),
            "last_text": text,
        }
        if state == State.DELIVERED:
            values["delivered_at"] = now
        if next_attempt_at is not None:
            values["next_attempt_at"] = next_attempt_at
        if pages is not None:
            values["pages"] = pages
        if line_seconds is not None:
            values["line_seconds"] = line_seconds
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(D)
                .where(D.c.id == delivery_id, D.c.state == State.SENT, D.c.remote_id == remote_id)
                .values(**values)
            ).rowcount
            if moved:
                conn.execute(
                    update(A)
                    .where(A.c.delivery_id == delivery_id, A.c.remote_id == remote_id)
                    .values(outcome=outcome, code=values["last_code"], text=text, pages=pages)
                )
                _mirror_digest(conn, delivery_id, state, values)
        return moved == 1

    def flag_number(self, number: str, reason: str, delivery_id: str | None, now: datetime) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(select(FN.c.number).where(FN.c.number == number)).first()
            if exists is None:
                conn.execute(insert(FN).values(number=number, reason=reason, delivery_id=delivery_id, flagged_at=now))

    def flagged(self, number: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(FN.c.reason).where(FN.c.number == number)).scalar_one_or_none()

    def flagged_numbers(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(FN).order_by(FN.c.flagged_at)).all()
        return [
            {"number": r.number, "reason": r.reason, "delivery": r.delivery_id, "flagged_at": r.flagged_at.isoformat()}
            for r in rows
        ]

    def unflag_number(self, number: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(delete(FN).where(FN.c.number == number)).rowcount == 1

    # ------------------------------------------------------------------ campaign lifecycle

    def close_campaign(self, campaign: str, reason: str, now: datetime) -> int | None:
        """Close ``campaign`` early: every letter still waiting, in every section, is cancelled
        with ``reason``. Returns how many; None if it was already closed."""
        with self.engine.begin() as conn:
            if conn.execute(select(CC.c.campaign).where(CC.c.campaign == campaign)).first() is not None:
                return None
            conn.execute(insert(CC).values(campaign=campaign, reason=reason, closed_at=now))
            return conn.execute(
                update(D)
                .where(D.c.campaign == campaign, D.c.state.in_(PENDING))
                .values(
                    state=State.CANCELLED,
                    updated_at=now,
                    last_outcome="cancelled",
                    last_text=f"campaign closed: {reason}",
                )
            ).rowcount

    def closure(self, campaign: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(CC.c.reason).where(CC.c.campaign == campaign)).scalar_one_or_none()

    # ------------------------------------------------------------------ paused channels

    def pause_channel(self, key: str, reason: str, now: datetime) -> bool:
        """Pause ``key`` ("email:us"); False if it already was (the first reason stays)."""
        with self.engine.begin() as conn:
            if conn.execute(select(PC.c.key).where(PC.c.key == key)).first() is not None:
                return False
            conn.execute(insert(PC).values(key=key, reason=reason, paused_at=now))
            return True

    def paused_channels(self) -> dict[str, dict[str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(PC).order_by(PC.c.paused_at)).all()
        return {r.key: {"reason": r.reason, "paused_at": r.paused_at.isoformat()} for r in rows}

    def resume_channel(self, key: str, now: datetime) -> int | None:
        """Resume ``key``; its waiting letters become due now. None if it was not paused."""
        channel, _, section = key.partition(":")
        with self.engine.begin() as conn:
            if conn.execute(delete(PC).where(PC.c.key == key)).rowcount == 0:
                return None
            return conn.execute(
                update(D)
                .where(
                    D.c.channel == channel,
                    D.c.section == section,
                    D.c.state == State.PLANNED,
                    D.c.next_attempt_at > now,
                    D.c.last_outcome.in_(("operational", "deferred")),
                )
                .values(next_attempt_at=now, updated_at=now)
            ).rowcount

    # ------------------------------------------------------------------ the outbox

    def mark_queued(self, ids: Sequence[str], now: datetime) -> int:
        """Record that messages for ``ids`` are about to go on the queue.

        Called *before* the messages are sent: marked afterwards, a fast worker could have
        claimed the letter, failed or deferred it back to planned, and the late mark would
        turn it into a "queued" letter with no message, stranded until the requeue timeout.
        Planned rows become queued; queued rows (a lost message sent again) restart their
        requeue clock; rows a worker already holds keep their state but get ``queued_at`` if
        they lack it.
        """
        if not ids:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(
                update(D)
                .where(D.c.id.in_(list(ids)), or_(D.c.state.in_(WAITING), D.c.queued_at.is_(None)))
                .values(
                    state=case((D.c.state == State.PLANNED, State.QUEUED.value), else_=D.c.state),
                    queued_at=func.coalesce(D.c.queued_at, now),
                    updated_at=now,
                )
            ).rowcount

    def unmark_queued(self, ids: Sequence[str], now: datetime) -> None:
        """Back to planned: the queue refused these messages (the reconciler sends them later)."""
        if not ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(D)
                .where(D.c.id.in_(list(ids)), D.c.state == State.QUEUED)
                .values(state=State.PLANNED, updated_at=now)
            )

    # ------------------------------------------------------------------ pacing

    def due_recipients(self, now: datetime, *, fresh_grace: timedelta) -> list[DueRecipient]:
        """Every recipient with planned letters due now, with how many, and one of its letters'
        route (the catalog gives its caps and office hours)."""
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
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

    def bundle(
        self, member_ids: Sequence[str], route: DigestRoute, now: datetime, *, oldest: datetime
    ) -> tuple[str, int] | None:
        """Bundle these planned, never-tried letters into a digest for ``route``: the route's
        digest still waiting for its first try if there is one, else a new one, dated ``oldest``
        (its oldest letter's creation: it takes that letter's place in the recipient's line).
        Returns the digest's id and how many letters joined it (None if none could: they moved
        meanwhile)."""
        try:
            return self._bundle(member_ids, route, now, oldest)
        except _NothingJoined:
            return None  # rolled back: no empty digest is left behind

    def _bundle(
        self, member_ids: Sequence[str], route: DigestRoute, now: datetime, oldest: datetime
    ) -> tuple[str, int]:
        with self.engine.begin() as conn:
            digest_id = conn.execute(
                select(D.c.id).where(
                    D.c.kind == "digest",
                    D.c.campaign == route.campaign,
                    D.c.section == route.section,
                    D.c.target == route.target,
                    D.c.channel == route.channel,
                    D.c.language == route.language,
                    D.c.state == State.PLANNED,
                    D.c.attempts == 0,
                )
            ).scalar()
            if digest_id is None:
                digest_id = new_id("dg")
                conn.execute(
                    insert(D).values(
                        id=digest_id,
                        appeal_id=None,
                        kind="digest",
                        campaign=route.campaign,
                        section=route.section,
                        target=route.target,
                        channel=route.channel,
                        recipient=route.recipient,
                        language=route.language,
                        state=State.PLANNED,
                        attempts=0,
                        next_attempt_at=now,
                        message_id=f"<{digest_id}@{route.domain}>",
                        created_at=oldest,
                        updated_at=now,
                    )
                )
            joined = conn.execute(
                update(D)
                .where(
                    D.c.id.in_(list(member_ids)),
                    D.c.kind == "letter",
                    D.c.state == State.PLANNED,
                    D.c.attempts == 0,
                )
                .values(state=State.BUNDLED, digest_id=digest_id, updated_at=now, last_text=f"bundled into {digest_id}")
            ).rowcount
            if not joined:
                raise _NothingJoined
        return digest_id, joined

    def digest_signers(self, digest_id: str) -> list[SupporterData]:
        """The supporters whose letters a digest carries, in the order they signed."""
        with self.engine.connect() as conn:
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

    def has_backlog(self, pairs: Sequence[tuple[str, str]], exclude: Sequence[str]) -> set[tuple[str, str]]:
        """Of these (channel, recipient) pairs, those with letters held in the ledger (planned:
        deferred by a cap, waiting for a retry or for the pacer), not counting ``exclude``."""
        if not pairs:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(D.c.channel, D.c.recipient)
                .where(
                    tuple_(D.c.channel, D.c.recipient).in_(list(pairs)),
                    D.c.state == State.PLANNED,
                    D.c.id.not_in(list(exclude)),
                )
                .distinct()
            ).all()
        return {(r.channel, r.recipient) for r in rows}

    def release_stale_claims(self, now: datetime, older_than: timedelta) -> list[str]:
        """Claims whose worker died mid-send go back to planned.

        For email this is the one place a letter may repeat: the worker may have died after
        the relay accepted DATA and before it recorded that. The repeat carries the same
        Message-ID, so a deduplicating relay or mail client drops it.
        """
        cutoff = now - older_than
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(D.c.id, D.c.attempts, D.c.claimed_by, D.c.claimed_at).where(
                    D.c.state == State.SENDING, D.c.claimed_at <= cutoff
                )
            ).all()
            released = []
            for row in rows:
                moved = conn.execute(
                    update(D)
                    .where(D.c.id == row.id, D.c.state == State.SENDING, D.c.claimed_by == row.claimed_by)
                    .values(
                        state=State.PLANNED,
                        claimed_by=None,
                        claimed_at=None,
                        next_attempt_at=now,
                        updated_at=now,
                        last_outcome="transient",
                        last_text=f"claim by {row.claimed_by} went stale; released for another try",
                    )
                ).rowcount
                if moved:
                    conn.execute(
                        insert(A).values(
                            delivery_id=row.id,
                            number=row.attempts,
                            started_at=row.claimed_at,
                            duration_ms=(now - row.claimed_at).total_seconds() * 1000.0,
                            outcome="transient",
                            code=None,
                            text="worker stopped answering mid-send (stale claim)",
                            worker=row.claimed_by,
                        )
                    )
                    released.append(row.id)
        return released

    def expire_waiting(self, campaign: str, section: str, deadline: datetime, now: datetime) -> int:
        if now < deadline:
            return 0
        with self.engine.begin() as conn:
            return conn.execute(
                update(D)
                .where(D.c.campaign == campaign, D.c.section == section, D.c.state.in_(PENDING))
                .values(
                    state=State.EXPIRED,
                    updated_at=now,
                    last_outcome="expired",
                    last_text=f"campaign deadline {deadline.isoformat()} passed before sending",
                )
            ).rowcount

    # ------------------------------------------------------------------ retention

    def purge_personal_data(self, now: datetime, retention: timedelta) -> int:
        """Blank supporters' personal data once every letter of their appeal is final and
        the retention period has passed since the appeal."""
        cutoff = now - retention
        # (digests have no appeal: a NULL in a NOT IN list would match nothing at all)
        unfinished = select(D.c.appeal_id).where(D.c.state.not_in(FINAL), D.c.appeal_id.is_not(None)).scalar_subquery()
        with self.engine.begin() as conn:
            return conn.execute(
                update(AP)
                .where(AP.c.pii_purged_at.is_(None), AP.c.created_at <= cutoff, AP.c.id.not_in(unfinished))
                .values(
                    supporter_name=None,
                    supporter_email=None,
                    supporter_city=None,
                    supporter_country=None,
                    supporter_languages=None,
                    message=None,
                    pii_purged_at=now,
                )
            ).rowcount

    def forget_signatures(self, older_than: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(UsedSignature).where(UsedSignature.seen_at < older_than)).rowcount

    # ------------------------------------------------------------------ reading

    def appeal_view(self, appeal_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            appeal = conn.execute(
                select(AP.c.id, AP.c.campaign, AP.c.section, AP.c.language, AP.c.created_at, AP.c.client_ref).where(
                    AP.c.id == appeal_id
                )
            ).one_or_none()
            if appeal is None:
                return None
            rows = conn.execute(select(D).where(D.c.appeal_id == appeal_id).order_by(D.c.target, D.c.channel)).all()
            tries: dict[str, list[dict[str, Any]]] = {}
            for t in conn.execute(
                select(A.c.delivery_id, A.c.number, A.c.started_at, A.c.outcome, A.c.code, A.c.text)
                .where(A.c.delivery_id.in_([r.id for r in rows]))
                .order_by(A.c.id)
            ):
                tries.setdefault(t.delivery_id, []).append(
                    {"number": t.number, "at": t.started_at.isoformat(), "outcome": t.outcome, "code": t.code}
                )
        return {
            "appeal_id": appeal.id,
            "campaign": appeal.campaign,
            "section": appeal.section,
            "language": appeal.language,
            "client_ref": appeal.client_ref,
            "created_at": appeal.created_at.isoformat(),
            # each letter with its schedule of tries so far
            "deliveries": [{**delivery_view(r), "tries": tries.get(r.id, [])} for r in rows],
        }

    def counters(self, campaign: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            appeals = conn.execute(
                select(AP.c.section, func.count()).where(AP.c.campaign == campaign).group_by(AP.c.section)
            ).all()
            letters = conn.execute(
                select(D.c.section, func.count())
                .where(D.c.campaign == campaign, D.c.state.in_(LETTER_OUT), D.c.kind == "letter")
                .group_by(D.c.section)
            ).all()
        by_section: dict[str, dict[str, int]] = {}
        for section, n in appeals:
            by_section.setdefault(section, {"appeals": 0, "letters_delivered": 0})["appeals"] = n
        for section, n in letters:
            by_section.setdefault(section, {"appeals": 0, "letters_delivered": 0})["letters_delivered"] = n
        return {
            "campaign": campaign,
            "appeals": sum(v["appeals"] for v in by_section.values()),
            "letters_delivered": sum(v["letters_delivered"] for v in by_section.values()),
            "by_section": dict(sorted(by_section.items())),
        }

    def attempts_of(self, delivery_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(A).where(A.c.delivery_id == delivery_id).order_by(A.c.id)).all()
        return [
            {
                "number": r.number,
                "started_at": r.started_at.isoformat(),
                "duration_ms": round(r.duration_ms, 1),
                "outcome": r.outcome,
                "code": r.code,
                "text": r.text,
                "remote_id": r.remote_id,
                "pages": r.pages,
            }
            for r in rows
        ]

    # ------------------------------------------------------------------ dead letters, shutdown

    def record_dead_letters(self, letters: Sequence[dict[str, Any]], now: datetime) -> list[str]:
        """Record queue messages dramatiq gave up on; returns the message ids that were new.

        Idempotent on ``message_id`` (the worker's middleware and the reconciler's sweep may both
        see the same one). A new dead letter whose delivery is still ``queued`` (its claim never
        happened: the usual cause is the database being away) is made due again at once, so the
        reconciler sends it on its next tick instead of after the requeue timeout.
        """
        from dispatcher.ledger.models import DeadLetter

        DL = cast(Table, DeadLetter.__table__)
        if not letters:
            return []
        by_id = {letter["message_id"]: letter for letter in letters}
        new: list[str] = []
        with self.engine.begin() as conn:
            known = set(conn.execute(select(DL.c.message_id).where(DL.c.message_id.in_(list(by_id)))).scalars())
            for message_id, letter in by_id.items():
                if message_id in known:
                    continue
                values = {**letter, "recorded_at": now}
                if self.engine.dialect.name in ("postgresql", "sqlite"):
                    # a concurrent recorder of the same message: the first row wins, no error
                    from sqlalchemy.dialects.postgresql import insert as pg_insert
                    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                    dialect_insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
                    inserted = conn.execute(
                        dialect_insert(DL).values(**values).on_conflict_do_nothing(index_elements=["message_id"])
                    ).rowcount
                else:
                    inserted = conn.execute(insert(DL).values(**values)).rowcount
                if not inserted:
                    continue
                new.append(message_id)
                if letter.get("delivery_id"):
                    conn.execute(
                        update(D)
                        .where(D.c.id == letter["delivery_id"], D.c.state == State.QUEUED)
                        .values(
                            state=State.PLANNED,
                            next_attempt_at=now,
                            updated_at=now,
                            last_text="its queue message was dead-lettered; released again",
                        )
                    )
        return new

    def dead_letters(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent dead letters, each with its delivery's current state."""
        from dispatcher.ledger.models import DeadLetter

        DL = cast(Table, DeadLetter.__table__)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(DL, D.c.state.label("delivery_state"))
                .select_from(DL.outerjoin(D, D.c.id == DL.c.delivery_id))
                .order_by(DL.c.failed_at.desc())
                .limit(limit)
            ).all()
        return [
            {
                "message_id": r.message_id,
                "delivery_id": r.delivery_id,
                "delivery_state": r.delivery_state,
                "queue": r.queue,
                "actor": r.actor,
                "reason": r.reason,
                "failed_at": r.failed_at.isoformat(),
                "recorded_at": r.recorded_at.isoformat(),
            }
            for r in rows
        ]

    def hand_back_claims(self, worker: str, now: datetime) -> list[str]:
        """A stopping worker gives back the letters it could not finish: each of ``worker``'s
        claims still in 'sending' goes to 'queued' (the caller puts a message on the queue for
        it), with a transient attempt, as a stale claim would — but at once, not minutes later.

        Compare-and-set on state and claimant: a letter the worker's thread recorded meanwhile, or
        that the reconciler already took back, is left alone.
        """
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(D.c.id, D.c.attempts, D.c.claimed_at).where(D.c.state == State.SENDING, D.c.claimed_by == worker)
            ).all()
            released = []
            for row in rows:
                moved = conn.execute(
                    update(D)
                    .where(D.c.id == row.id, D.c.state == State.SENDING, D.c.claimed_by == worker)
                    .values(
                        state=State.QUEUED,
                        claimed_by=None,
                        claimed_at=None,
                        queued_at=func.coalesce(D.c.queued_at, now),
                        updated_at=now,
                        last_outcome="transient",
                        last_text=f"handed back by {worker} at shutdown, mid-send",
                    )
                ).rowcount
                if moved:
                    started = row.claimed_at or now
                    conn.execute(
                        insert(A).values(
                            delivery_id=row.id,
                            number=row.attempts,
                            started_at=started,
                            duration_ms=(now - started).total_seconds() * 1000.0,
                            outcome="transient",
                            code=None,
                            text="worker shut down mid-send; handed back (the letter may have gone out)",
                            worker=worker,
                        )
                    )
                    released.append(row.id)
        return released


class _NothingJoined(Exception):
    pass


def _mirror_digest(conn: Any, digest_id: str, state: State, values: dict[str, Any]) -> None:
    """A digest's letters follow it: sent, delivered or failed with it, and bundled again while
    it waits for another try. Letters already expired or cancelled stay so."""
    mirrored = State.BUNDLED if state in (State.PLANNED, State.QUEUED, State.SENDING) else state
    copied = {k: v for k, v in values.items() if k in ("sent_at", "delivered_at", "last_outcome", "last_code")}
    text = values.get("last_text")
    conn.execute(
        update(D)
        .where(D.c.digest_id == digest_id, D.c.state.in_((State.BUNDLED, State.SENT)))
        .values(
            state=mirrored,
            updated_at=values["updated_at"],
            last_text=f"in digest {digest_id}: {text}" if text else f"in digest {digest_id}",
            **copied,
        )
    )


def delivery_view(r: Any) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": r.id,
        "target": r.target,
        "channel": r.channel,
        "language": r.language,
        "state": r.state,
        "attempts": r.attempts,
        "next_attempt_at": iso(r.next_attempt_at) if r.state in WAITING else None,
        "sent_at": iso(r.sent_at),
        "last_outcome": r.last_outcome,
        "last_code": r.last_code,
        "last_text": r.last_text,
        **({"digest": r.digest_id} if r.digest_id else {}),
        **(
            {"gateway": r.gateway, "remote_id": r.remote_id, "pages": r.pages, "line_seconds": r.line_seconds}
            if r.channel == "fax"
            else {}
        ),
    }
