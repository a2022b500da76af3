"""Reports that came early: a channel's final word on a letter whose send is not recorded yet.

A gateway may answer its create call slowly and send the fax's final webhook first. That
webhook is the only one it sends, so it is kept here and applied once the send is recorded (by
the worker right after it records the send, or by the reconciler's sweep should that worker die).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, delete, insert, select

from dispatcher.ledger.engine import reading
from dispatcher.ledger.states import State
from dispatcher.ledger.tables import ER, D


@dataclass(frozen=True)
class Parked:
    id: int
    delivery_id: str
    channel: str
    remote_id: str
    #: the report, as its channel's applier wrote it
    report: str
    received_at: datetime


class EarlyReports:
    def __init__(self, engine: Engine):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)

    def park(self, delivery_id: str, channel: str, remote_id: str, report: str, now: datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                insert(ER).values(
                    delivery_id=delivery_id, channel=channel, remote_id=remote_id, report=report, received_at=now
                )
            )

    def of(self, delivery_id: str) -> list[Parked]:
        with self.reads.connect() as conn:
            rows = conn.execute(select(ER).where(ER.c.delivery_id == delivery_id).order_by(ER.c.id)).all()
        return [Parked(r.id, r.delivery_id, r.channel, r.remote_id, r.report, r.received_at) for r in rows]

    def ready(self, limit: int = 100) -> list[Parked]:
        """Parked reports whose letter is no longer being sent: their send has been recorded (or
        the letter moved on another way) and they can be applied, or dropped as stale."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(ER)
                .join(D, D.c.id == ER.c.delivery_id, isouter=True)
                .where((D.c.state.is_(None)) | (D.c.state != State.SENDING))
                .order_by(ER.c.id)
                .limit(limit)
            ).all()
        return [Parked(r.id, r.delivery_id, r.channel, r.remote_id, r.report, r.received_at) for r in rows]

    def drop(self, ids: Sequence[int]) -> None:
        if ids:
            with self.engine.begin() as conn:
                conn.execute(delete(ER).where(ER.c.id.in_(list(ids))))
