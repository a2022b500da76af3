"""Operators' controls in the ledger: paused channels, flagged fax numbers, closed campaigns.

An action an operator takes (``by``: the console's operator, or ``cli:<user>``) is written to the
audit log in the action's own transaction (:mod:`dispatcher.ledger.audit`); the service's own
moves (a worker pausing a channel its relay refuses) pass no ``by`` and are not audited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, update

from dispatcher.ledger.audit import Audit
from dispatcher.ledger.engine import reading
from dispatcher.ledger.lifecycle import Lifecycle
from dispatcher.ledger.states import State
from dispatcher.ledger.tables import CC, FN, PC, D


@dataclass(frozen=True)
class Pause:
    key: str
    reason: str
    paused_at: datetime


@dataclass(frozen=True)
class FlaggedNumber:
    number: str
    reason: str
    delivery: str | None
    flagged_at: datetime


@dataclass(frozen=True)
class Closure:
    campaign: str
    reason: str
    closed_at: datetime


#: asked on every appeal: built once
_CLOSURE = select(CC).where(CC.c.campaign == bindparam("p_campaign"))
_CLOSURES = select(CC).where(CC.c.campaign.in_(bindparam("p_campaigns", expanding=True)))


class Controls:
    def __init__(self, engine: Engine):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)

    # ------------------------------------------------------------------ closed campaigns

    def close_campaign(self, campaign: str, reason: str, now: datetime, *, by: str | None = None) -> int | None:
        """Close ``campaign`` early: every letter still waiting, in every section, is cancelled
        with ``reason``, and none sent or being sent will wait again. Returns how many were
        cancelled; None if it was already closed. ``by``: who, for the audit log (a closing
        concerns every section: its entry has none)."""
        with self.engine.begin() as conn:
            if conn.execute(select(CC.c.campaign).where(CC.c.campaign == campaign)).first() is not None:
                return None
            conn.execute(insert(CC).values(campaign=campaign, reason=reason, closed_at=now))
            cancelled = Lifecycle.cancel_campaign(conn, campaign, reason, now)
            if by is not None:
                Audit.record(
                    conn,
                    actor=by,
                    action="campaign.close",
                    target_kind="campaign",
                    target_id=campaign,
                    now=now,
                    reason=reason,
                    detail=f"{cancelled} waiting letter(s) cancelled",
                )
            return cancelled

    def closure(self, campaign: str) -> Closure | None:
        with self.reads.connect() as conn:
            row = conn.execute(_CLOSURE, {"p_campaign": campaign}).one_or_none()
        return None if row is None else Closure(row.campaign, row.reason, row.closed_at)

    def closures(self, campaigns: Sequence[str], *, conn: Connection) -> dict[str, Closure]:
        """The early closures among ``campaigns``, within ``conn``'s transaction."""
        rows = conn.execute(_CLOSURES, {"p_campaigns": list(campaigns)}).all()
        return {row.campaign: Closure(row.campaign, row.reason, row.closed_at) for row in rows}

    # ------------------------------------------------------------------ paused channels

    def pause_channel(self, key: str, reason: str, now: datetime, *, by: str | None = None) -> bool:
        """Pause ``key`` ("email:us"); False if it already was (the first reason stays)."""
        with self.engine.begin() as conn:
            if conn.execute(select(PC.c.key).where(PC.c.key == key)).first() is not None:
                return False
            conn.execute(insert(PC).values(key=key, reason=reason, paused_at=now))
            if by is not None:
                Audit.record(
                    conn,
                    actor=by,
                    action="channel.pause",
                    target_kind="channel",
                    target_id=key,
                    now=now,
                    section=key.partition(":")[2] or None,
                    reason=reason,
                )
            return True

    def paused_channels(self) -> dict[str, Pause]:
        with self.reads.connect() as conn:
            rows = conn.execute(select(PC).order_by(PC.c.paused_at)).all()
        return {r.key: Pause(r.key, r.reason, r.paused_at) for r in rows}

    def resume_channel(
        self, key: str, now: datetime, *, by: str | None = None, reason: str | None = None
    ) -> int | None:
        """Resume ``key``; its waiting letters become due now. None if it was not paused."""
        channel, _, section = key.partition(":")
        with self.engine.begin() as conn:
            if conn.execute(delete(PC).where(PC.c.key == key)).rowcount == 0:
                return None
            # Not a move: the letters stay planned and only become due sooner.
            released: int = conn.execute(
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
            if by is not None:
                Audit.record(
                    conn,
                    actor=by,
                    action="channel.resume",
                    target_kind="channel",
                    target_id=key,
                    now=now,
                    section=section or None,
                    reason=reason,
                    detail=f"{released} waiting letter(s) due now",
                )
            return released

    # ------------------------------------------------------------------ flagged fax numbers

    def flag_number(self, number: str, reason: str, delivery_id: str | None, now: datetime) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(select(FN.c.number).where(FN.c.number == number)).first()
            if exists is None:
                conn.execute(insert(FN).values(number=number, reason=reason, delivery_id=delivery_id, flagged_at=now))

    def flagged(self, number: str) -> str | None:
        with self.reads.connect() as conn:
            return conn.execute(select(FN.c.reason).where(FN.c.number == number)).scalar_one_or_none()

    def flagged_numbers(self) -> list[FlaggedNumber]:
        with self.reads.connect() as conn:
            rows = conn.execute(select(FN).order_by(FN.c.flagged_at)).all()
        return [FlaggedNumber(r.number, r.reason, r.delivery_id, r.flagged_at) for r in rows]

    def flagged_number(self, number: str) -> FlaggedNumber | None:
        with self.reads.connect() as conn:
            r = conn.execute(select(FN).where(FN.c.number == number)).one_or_none()
        return None if r is None else FlaggedNumber(r.number, r.reason, r.delivery_id, r.flagged_at)

    def unflag_number(
        self, number: str, *, now: datetime | None = None, by: str | None = None, reason: str | None = None
    ) -> bool:
        """Clear ``number``; False if it was not flagged. ``by`` (with ``now``) audits it, under
        the section of the letter that flagged it (a number is every section's, but that letter
        is whose problem it was)."""
        with self.engine.begin() as conn:
            section = conn.execute(
                select(D.c.section).select_from(FN.join(D, D.c.id == FN.c.delivery_id)).where(FN.c.number == number)
            ).scalar_one_or_none()
            if conn.execute(delete(FN).where(FN.c.number == number)).rowcount != 1:
                return False
            if by is not None:
                if now is None:
                    raise ValueError("an audited unflag needs its time")
                Audit.record(
                    conn,
                    actor=by,
                    action="number.unflag",
                    target_kind="number",
                    target_id=number,
                    now=now,
                    section=section,
                    reason=reason,
                )
            return True
