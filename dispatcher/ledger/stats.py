"""The ledger's state in numbers, for the metrics read at scrape time: letters by channel,
section and state, how many are due and how late the most overdue is, dead letters, paused
channels, flagged recipients.

Read in one read-only transaction (``reading``: on SQLite no write lock, a snapshot beside the
writers), so the numbers agree with each other and with the ledger at that instant. The letters
are one ``GROUP BY`` over ``deliveries``: a scan of the table, a few milliseconds per ten
thousand rows (docs/metrics.md has the figures); the other three read small tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, case, func, select

from dispatcher.ledger.engine import reading
from dispatcher.ledger.states import WAITING, State
from dispatcher.ledger.tables import DL, FN, PC, D


@dataclass(frozen=True)
class LetterCount:
    channel: str
    section: str
    state: str
    count: int


@dataclass(frozen=True)
class Waiting:
    """A channel's letters waiting in the ledger or on the queue (planned or queued)."""

    #: of them, those whose time has come (not held for later by a backoff, caps or office hours)
    due: int
    #: when the longest-due of them became due (None: none is due)
    oldest_due_at: datetime | None
    #: when the longest-queued of them was put on the queue (None: none is queued)
    oldest_queued_at: datetime | None


@dataclass(frozen=True)
class LedgerSnapshot:
    letters: tuple[LetterCount, ...]
    #: per channel that has letters waiting
    waiting: dict[str, Waiting]
    dead_letters: int
    #: ``channel:section`` keys paused by an operational failure
    paused: frozenset[str]
    flagged_recipients: int


class Stats:
    def __init__(self, engine: Engine):
        self.reads = reading(engine)

    def snapshot(self, now: datetime) -> LedgerSnapshot:
        is_due = and_(D.c.state.in_(WAITING), D.c.next_attempt_at <= now)
        by_state = (
            select(
                D.c.channel,
                D.c.section,
                D.c.state,
                func.count().label("n"),
                func.count(case((is_due, 1))).label("due"),
                func.min(case((is_due, D.c.next_attempt_at))).label("oldest_due"),
                func.min(case((D.c.state == State.QUEUED, D.c.queued_at))).label("oldest_queued"),
            )
            .group_by(D.c.channel, D.c.section, D.c.state)
            .order_by(D.c.channel, D.c.section, D.c.state)
        )
        with self.reads.begin() as conn:
            rows = conn.execute(by_state).all()
            dead = conn.execute(select(func.count()).select_from(DL)).scalar_one()
            paused = frozenset(conn.execute(select(PC.c.key)).scalars())
            flagged = conn.execute(select(func.count()).select_from(FN)).scalar_one()
        letters = tuple(LetterCount(r.channel, r.section, r.state, r.n) for r in rows)
        waiting: dict[str, Waiting] = {}
        for r in rows:
            if r.state not in WAITING:
                continue
            seen = waiting.get(r.channel, Waiting(0, None, None))
            waiting[r.channel] = Waiting(
                seen.due + r.due,
                _earliest(seen.oldest_due_at, r.oldest_due),
                _earliest(seen.oldest_queued_at, r.oldest_queued),
            )
        return LedgerSnapshot(letters, waiting, int(dead), paused, int(flagged))


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
