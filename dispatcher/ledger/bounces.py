"""What bounces taught us: the suppression list, and the facts of every bounce.

The suppression list is shared by every campaign and section: an embassy address that bounced
for good is not written to again by that channel, whoever writes (docs/email.md, "Bounces").
Addresses are kept lower-cased; they are officials' addresses, not supporters'.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from dispatcher.ledger.engine import reading
from dispatcher.ledger.tables import BF, SU


@dataclass(frozen=True)
class Suppressed:
    channel: str
    address: str
    #: "bounced", "soft_bounces", "rejected", "operator"
    reason: str
    code: str | None
    text: str | None
    delivery: str | None
    since: datetime

    def describe(self) -> str:
        said = " ".join(p for p in (self.code, self.text) if p)
        return f"address known to bounce (since {self.since:%Y-%m-%d}{': ' + said if said else ''})"


@dataclass(frozen=True)
class BounceView:
    delivery: str
    kind: str
    status: str | None
    diagnostic: str | None
    reporting_mta: str | None
    arrived_at: datetime | None
    received_at: datetime


def _key(address: str) -> str:
    return address.strip().lower()


class Suppressions:
    def __init__(self, engine: Engine):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)
        # asked once per letter by the worker: built once
        self._find = select(SU).where(SU.c.channel == bindparam("p_channel"), SU.c.address == bindparam("p_address"))

    def add(
        self,
        channel: str,
        address: str,
        *,
        reason: str,
        now: datetime,
        code: str | int | None = None,
        text: str | None = None,
        delivery: str | None = None,
    ) -> bool:
        """Suppress ``address`` on ``channel``; False if it already was (the first reason stays)."""
        try:
            with self.engine.begin() as conn:
                if self.find(channel, address, conn=conn) is not None:
                    return False
                conn.execute(
                    insert(SU).values(
                        channel=channel,
                        address=_key(address),
                        reason=reason,
                        code=None if code is None else str(code)[:16],
                        text=text,
                        delivery_id=delivery,
                        created_at=now,
                    )
                )
        except IntegrityError:
            return False  # another process suppressed it at the same moment
        return True

    def find(self, channel: str, address: str, *, conn: Connection | None = None) -> Suppressed | None:
        params = {"p_channel": channel, "p_address": _key(address)}
        if conn is not None:
            row = conn.execute(self._find, params).first()
        else:
            with self.reads.connect() as c:
                row = c.execute(self._find, params).first()
        return None if row is None else _suppressed(row)

    def version(self) -> tuple[int, int | None]:
        """Changes whenever an address is added or removed: a cache's cheap freshness check."""
        with self.reads.connect() as conn:
            row = conn.execute(select(func.count(), func.max(SU.c.id))).one()
        return int(row[0]), row[1]

    def keys(self) -> frozenset[tuple[str, str]]:
        """Every suppressed (channel, address), addresses lower-cased."""
        with self.reads.connect() as conn:
            return frozenset((r.channel, r.address) for r in conn.execute(select(SU.c.channel, SU.c.address)))

    def remove(self, address: str, channel: str | None = None) -> int:
        """Lift the suppression of ``address`` (on every channel unless ``channel``)."""
        where = [SU.c.address == _key(address)]
        if channel is not None:
            where.append(SU.c.channel == channel)
        with self.engine.begin() as conn:
            return conn.execute(delete(SU).where(*where)).rowcount

    def count(self) -> int:
        """How many addresses are suppressed, on every channel."""
        with self.reads.connect() as conn:
            n: int = conn.execute(select(func.count()).select_from(SU)).scalar_one()
        return n

    def all(self, channel: str | None = None) -> list[Suppressed]:
        query = select(SU).order_by(SU.c.created_at, SU.c.id)
        if channel is not None:
            query = query.where(SU.c.channel == channel)
        with self.reads.connect() as conn:
            return [_suppressed(row) for row in conn.execute(query)]


class BounceFacts:
    def __init__(self, engine: Engine):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)

    def record(
        self,
        *,
        delivery: str,
        channel: str,
        address: str,
        kind: str,
        now: datetime,
        status: str | None = None,
        diagnostic: str | None = None,
        reporting_mta: str | None = None,
        arrived_at: datetime | None = None,
    ) -> int | None:
        """Keep one fact and return its id; None when the same fact is kept already (its message
        came twice: a relay that missed our 250, an IMAP poller's at-least-once), so it counts
        once."""
        with self.engine.begin() as conn:
            same = conn.execute(
                select(BF.c.id)
                .where(
                    BF.c.delivery_id == delivery,
                    BF.c.kind == kind,
                    BF.c.status.is_not_distinct_from(status),
                    BF.c.reporting_mta.is_not_distinct_from(reporting_mta),
                    BF.c.arrived_at.is_not_distinct_from(arrived_at),
                )
                .limit(1)
            ).first()
            if same is not None:
                return None
            kept = conn.execute(
                insert(BF)
                .values(
                    delivery_id=delivery,
                    channel=channel,
                    address=_key(address),
                    kind=kind,
                    status=status,
                    diagnostic=diagnostic,
                    reporting_mta=reporting_mta,
                    arrived_at=arrived_at,
                    received_at=now,
                )
                .returning(BF.c.id)
            ).scalar_one()
        return int(kept)

    def forget(self, fact: int) -> None:
        """Drop a fact kept moments ago whose bounce could not be applied: when its message comes
        again (the relay retries after our 451) it must not read as a duplicate."""
        with self.engine.begin() as conn:
            conn.execute(delete(BF).where(BF.c.id == fact))

    def count(self, channel: str, address: str, kind: str, since: datetime) -> int:
        """How many bounces of ``kind`` came for ``address`` since ``since``."""
        with self.reads.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(
                        BF.c.channel == channel,
                        BF.c.address == _key(address),
                        BF.c.kind == kind,
                        BF.c.received_at >= since,
                    )
                ).scalar_one()
            )

    def of(self, delivery: str) -> list[BounceView]:
        with self.reads.connect() as conn:
            rows = conn.execute(select(BF).where(BF.c.delivery_id == delivery).order_by(BF.c.received_at, BF.c.id))
            return [
                BounceView(r.delivery_id, r.kind, r.status, r.diagnostic, r.reporting_mta, r.arrived_at, r.received_at)
                for r in rows
            ]


def _suppressed(r: Any) -> Suppressed:
    return Suppressed(r.channel, r.address, r.reason, r.code, r.text, r.delivery_id, r.created_at)
