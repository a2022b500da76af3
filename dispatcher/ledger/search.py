"""Finding letters: the console's search, its pages and its CSV export.

A search names any of: campaign, section, target, channel, states, a time range (when the letter
was planned), a delivery id, an appeal id, and a supporter — by the keyed hash of their email
(``supporter_ref``, computed by the caller with the intake's key), never by a pattern over
personal data: the ledger is searched for one supporter whose address the operator already
knows, not browsed. An operator scoped to some sections passes them as ``sections`` and sees
nothing else, whatever the query names.

Pages run newest first and are keyset-paged on (created_at, id): a page's ``next_cursor`` is where
the next one starts, stable while letters are added. The CSV has the columns the results table
shows, none of them personal data.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, and_, func, or_, select
from sqlalchemy.sql.elements import ColumnElement

from dispatcher.errors import DispatchError
from dispatcher.ledger.engine import reading
from dispatcher.ledger.states import State
from dispatcher.ledger.tables import AP, D
from dispatcher.ledger.views import DeliveryView


@dataclass(frozen=True)
class LetterQuery:
    """What to look for; None (or empty) matches anything."""

    campaign: str | None = None
    section: str | None = None
    target: str | None = None
    channel: str | None = None
    states: tuple[State, ...] = ()
    #: planned at or after / before
    since: datetime | None = None
    until: datetime | None = None
    delivery_id: str | None = None
    appeal_id: str | None = None
    #: the keyed hash of a supporter's email (never the email itself)
    supporter_ref: str | None = None


@dataclass(frozen=True)
class LetterRow:
    """One line of the results table and of the CSV: no personal data."""

    id: str
    appeal_id: str | None
    kind: str
    campaign: str
    section: str
    target: str
    channel: str
    language: str
    state: str
    attempts: int
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    last_outcome: str | None
    last_code: str | None
    last_text: str | None
    gateway: str | None
    remote_id: str | None


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(LetterRow))


@dataclass(frozen=True)
class LetterPage:
    rows: tuple[LetterRow, ...]
    total: int
    #: where the next page starts (None on the last page)
    next_cursor: str | None


class BadCursor(DispatchError, ValueError):
    """A page link whose cursor cannot be read (cut short, or made up)."""


def _cursor(row: LetterRow) -> str:
    return f"{row.created_at.isoformat()}~{row.id}"


def _parse_cursor(cursor: str) -> tuple[datetime, str]:
    at, sep, delivery = cursor.partition("~")
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        raise BadCursor(cursor) from None
    if not sep or not delivery:
        raise BadCursor(cursor)
    return when, delivery


class LetterSearch:
    def __init__(self, engine: Engine):
        self.reads = reading(engine)

    def page(
        self,
        query: LetterQuery,
        *,
        sections: Collection[str] | None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> LetterPage:
        """One page, newest first. ``sections`` None: every section (an unscoped operator)."""
        where = self._where(query, sections)
        with self.reads.connect() as conn:
            total = conn.execute(select(func.count()).select_from(D).where(*where)).scalar_one()
            statement = self._select(where)
            if cursor is not None:
                at, delivery = _parse_cursor(cursor)
                statement = statement.where(or_(D.c.created_at < at, and_(D.c.created_at == at, D.c.id < delivery)))
            rows = [LetterRow(**r._mapping) for r in conn.execute(statement.limit(limit + 1))]
        page = tuple(rows[:limit])
        return LetterPage(page, total, _cursor(page[-1]) if len(rows) > limit else None)

    def rows(
        self, query: LetterQuery, *, sections: Collection[str] | None, limit: int = 100_000
    ) -> Iterator[LetterRow]:
        """Every matching row, newest first (for the CSV), up to ``limit``."""
        with self.reads.connect() as conn:
            for r in conn.execute(self._select(self._where(query, sections)).limit(limit)):
                yield LetterRow(**r._mapping)

    def csv(self, query: LetterQuery, *, sections: Collection[str] | None) -> Iterator[str]:
        """The CSV, a line at a time (streamed to the browser)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(COLUMNS)
        yield _drain(buffer)
        for row in self.rows(query, sections=sections):
            writer.writerow([_cell(getattr(row, name)) for name in COLUMNS])
            yield _drain(buffer)

    @staticmethod
    def _select(where: list[ColumnElement[bool]]) -> Select[Any]:
        return select(*(D.c[name] for name in COLUMNS)).where(*where).order_by(D.c.created_at.desc(), D.c.id.desc())

    @staticmethod
    def _where(query: LetterQuery, sections: Collection[str] | None) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if sections is not None:
            where.append(D.c.section.in_(sorted(sections)))
        for column, value in (
            (D.c.campaign, query.campaign),
            (D.c.section, query.section),
            (D.c.target, query.target),
            (D.c.channel, query.channel),
            (D.c.id, query.delivery_id),
            (D.c.appeal_id, query.appeal_id),
        ):
            if value:
                where.append(column == value)
        if query.states:
            where.append(D.c.state.in_([s.value for s in query.states]))
        if query.since is not None:
            where.append(D.c.created_at >= query.since)
        if query.until is not None:
            where.append(D.c.created_at < query.until)
        if query.supporter_ref:
            where.append(D.c.appeal_id.in_(select(AP.c.id).where(AP.c.supporter_ref == query.supporter_ref)))
        return where


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _cell(value: object) -> str:
    """A CSV cell; text a spreadsheet would read as a formula (a relay's reply beginning with
    '=', say) is quoted with a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def delivery_in(view: DeliveryView | None, sections: Collection[str] | None) -> DeliveryView | None:
    """``view`` if an operator scoped to ``sections`` may see it, else None (the console answers
    404, as for a letter that does not exist)."""
    if view is None or (sections is not None and view.section not in sections):
        return None
    return view
