"""Erasing a supporter's data on request (GDPR art. 17): the ledger's part, in one transaction.

A supporter is named by an appeal id or by the keyed hash of their email (``supporter_ref``,
dispatcher/pseudonyms.py: the ledger never looks an address up in clear), optionally narrowed
to a section or a campaign. For every appeal that matches, in one transaction:

* its letters not yet out (planned, queued, bundled into a digest still waiting) are cancelled
  with the text "erased" through the state table's one writer; a letter in a worker's hands or
  already sent is left alone, and should it come back to waiting it is cancelled instead
  (lifecycle.py). A digest lists its supporters when it is rendered, from its letters still
  bundled: a cancelled letter leaves it;
* the personal data of the appeal row is blanked as the retention purge blanks it
  (:func:`dispatcher.ledger.housekeeping.blanked`), and the row marked ``erased_at``; the row
  itself stays, so the anonymous counts (appeals, letters delivered) do not change;
* any text the outside world wrote about its letters or the digests that carried them (a relay's
  answer, a bounce's diagnostic, a dead letter's reason, a parked report) has the supporter's
  name and address replaced by ``[erased]``: every Text column of every table that points at a
  delivery, found from the table definitions, not from a list kept by hand;
* one audit entry names the appeal (or the keyed hash) and the counts, never the person.

Erasing again is harmless: an appeal already erased is reported as such and nothing changes.
The files a letter left outside the ledger (the sandbox's copies) are the caller's
(dispatcher/supporters.py), after the commit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, Table, Text, select, update
from sqlalchemy.sql.elements import ColumnElement

from dispatcher.errors import NotFound
from dispatcher.ledger.audit import Audit
from dispatcher.ledger.engine import reading
from dispatcher.ledger.housekeeping import blanked
from dispatcher.ledger.lifecycle import Lifecycle
from dispatcher.ledger.models import Base
from dispatcher.ledger.states import LETTER_OUT, PENDING, State
from dispatcher.ledger.tables import AP, D

#: what replaces a supporter's name or address inside a text
REDACTED = "[erased]"
#: the audit log's action
ACTION = "supporter.erase"


@dataclass(frozen=True)
class Who:
    """Whose data: one appeal, or every appeal of one supporter (by the keyed hash of their
    email), within one section and campaign if given."""

    appeal_id: str | None = None
    supporter_ref: str | None = None
    section: str | None = None
    campaign: str | None = None

    def __post_init__(self) -> None:
        if (self.appeal_id is None) == (self.supporter_ref is None):
            raise ValueError("name the supporter by an appeal id or by the keyed hash of an email, one of them")

    @property
    def target(self) -> tuple[str, str]:
        """The audit log's (target_kind, target_id): never the person."""
        if self.appeal_id is not None:
            return "appeal", self.appeal_id
        assert self.supporter_ref is not None
        return "supporter", self.supporter_ref


@dataclass(frozen=True)
class AppealToErase:
    """What an erasure would do to one appeal (counts only: shown before it is done)."""

    appeal_id: str
    section: str
    campaign: str
    already_erased: bool
    #: letters not yet out: cancelled by the erasure
    waiting: int
    #: letters in a worker's hands: left to finish (cancelled should they come back to waiting)
    in_flight: int
    #: letters that reached the official (kept, and counted as before)
    out: int


@dataclass(frozen=True)
class LedgerErasure:
    """What an erasure did in the ledger."""

    appeals: tuple[AppealToErase, ...]
    #: the appeals erased by this call (the others were erased before)
    erased: tuple[str, ...]
    #: the letters it cancelled
    cancelled: tuple[str, ...]
    #: the letters left in a worker's hands
    in_flight: tuple[str, ...]
    #: texts from which the name or address was taken out
    texts_redacted: int
    #: (delivery id, Message-ID) of every letter of these appeals and of every digest that
    #: carried one: whatever copies they left outside the ledger (the sandbox's) go too
    letters: tuple[tuple[str, str], ...]


def _matching(who: Who) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if who.appeal_id is not None:
        where.append(AP.c.id == who.appeal_id)
    if who.supporter_ref is not None:
        where.append(AP.c.supporter_ref == who.supporter_ref)
    if who.section is not None:
        where.append(AP.c.section == who.section)
    if who.campaign is not None:
        where.append(AP.c.campaign == who.campaign)
    return where


def _not_found(who: Who) -> NotFound:
    # The same words whether the appeal does not exist or belongs to another section: a section
    # learns nothing of another's supporters.
    what = f"appeal {who.appeal_id!r}" if who.appeal_id is not None else "appeal by this email"
    where = f" in section {who.section!r}" if who.section is not None else ""
    campaign = f" for campaign {who.campaign!r}" if who.campaign is not None else ""
    return NotFound(f"no {what}{where}{campaign}")


def _linked_tables() -> list[tuple[Table, str]]:
    """Every table that holds rows about a delivery, with the column naming it: the deliveries
    themselves (``id``) and every table with a ``delivery_id`` column (attempts, dead letters,
    early reports, bounces, suppressions, flagged numbers, and any added later)."""
    found: list[tuple[Table, str]] = []
    for table in Base.metadata.sorted_tables:
        if table.name == D.name:
            found.append((table, "id"))
        elif "delivery_id" in table.c:
            found.append((table, "delivery_id"))
    return found


def _redact(conn: Connection, delivery_ids: Sequence[str], needles: Sequence[str]) -> int:
    """Replace each needle (a name, an address) in every text about these deliveries; returns
    how many values changed."""
    if not delivery_ids or not needles:
        return 0
    pattern = re.compile("|".join(re.escape(n) for n in sorted(needles, key=len, reverse=True)), re.IGNORECASE)
    changed = 0
    for table, key in _linked_tables():
        texts = [c for c in table.c if isinstance(c.type, Text)]
        if not texts:
            continue
        primary = list(table.primary_key.columns)
        rows = conn.execute(select(*primary, *texts).where(table.c[key].in_(list(delivery_ids)))).all()
        for row in rows:
            values = {}
            for column in texts:
                value = row._mapping[column]
                if isinstance(value, str) and pattern.search(value):
                    values[column.name] = pattern.sub(REDACTED, value)
            if values:
                conn.execute(update(table).where(*(c == row._mapping[c] for c in primary)).values(**values))
                changed += len(values)
    return changed


class Erasures:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.reads = reading(engine)

    def preview(self, who: Who) -> tuple[AppealToErase, ...]:
        """What :meth:`erase` would do; NotFound if nothing matches."""
        with self.reads.connect() as conn:
            found = self._appeals(conn, who)
        if not found:
            raise _not_found(who)
        return found

    def is_erased(self, appeal_id: str) -> bool:
        with self.reads.connect() as conn:
            at = conn.execute(select(AP.c.erased_at).where(AP.c.id == appeal_id)).scalar_one_or_none()
        return at is not None

    def erase(self, who: Who, *, actor: str, now: datetime, reason: str | None = None) -> LedgerErasure:
        """Erase in one transaction (see the module's doc); NotFound if nothing matches, and then
        nothing is written, not even an audit entry."""
        if not actor.strip():
            raise ValueError("an erasure names who asked for it (actor)")
        with self.engine.begin() as conn:
            # Locked (PostgreSQL): two erasures of one supporter at once queue, and the second
            # finds the first's work done.
            rows = conn.execute(
                select(AP.c.id, AP.c.supporter_name, AP.c.supporter_email, AP.c.client_ref, AP.c.erased_at)
                .where(*_matching(who))
                .order_by(AP.c.created_at, AP.c.id)
                .with_for_update()
            ).all()
            if not rows:
                raise _not_found(who)
            appeals = self._appeals(conn, who)
            ids = [r.id for r in rows]
            to_erase = [r.id for r in rows if r.erased_at is None]
            needles = sorted(
                {v.strip() for r in rows for v in (r.supporter_name, r.supporter_email) if v and v.strip()}
            )
            cancelled = Lifecycle.cancel_erased(conn, ids, now)
            letters = conn.execute(
                select(D.c.id, D.c.message_id, D.c.state, D.c.digest_id).where(D.c.appeal_id.in_(ids))
            ).all()
            digests = sorted({r.digest_id for r in letters if r.digest_id is not None})
            digest_rows = (
                conn.execute(select(D.c.id, D.c.message_id).where(D.c.id.in_(digests))).all() if digests else []
            )
            redacted = _redact(conn, [r.id for r in letters] + digests, needles)
            for row in rows:
                # a form's own submission id may quote the person (it is theirs to choose)
                if row.client_ref and any(n.lower() in row.client_ref.lower() for n in needles):
                    conn.execute(update(AP).where(AP.c.id == row.id).values(client_ref=None))
                    redacted += 1
            if to_erase:
                conn.execute(update(AP).where(AP.c.id.in_(to_erase)).values(**blanked(now), erased_at=now))
            sending = set(conn.execute(select(D.c.id).where(D.c.id.in_(digests), D.c.state == State.SENDING)).scalars())
            in_flight = sorted(
                r.id
                for r in letters
                if r.state == State.SENDING or (r.state == State.BUNDLED and r.digest_id in sending)
            )
            kind, target = who.target
            sections = {a.section for a in appeals}
            Audit.record(
                conn,
                actor=actor,
                action=ACTION,
                target_kind=kind,
                target_id=target,
                now=now,
                section=who.section or (next(iter(sections)) if len(sections) == 1 else None),
                reason=reason,
                detail=(
                    f"{len(to_erase)} appeal(s) erased"
                    + (f", {len(ids) - len(to_erase)} already erased" if len(to_erase) < len(ids) else "")
                    + f", {len(cancelled)} letter(s) cancelled"
                    + (f", {len(in_flight)} being sent left to finish" if in_flight else "")
                ),
            )
        return LedgerErasure(
            appeals=appeals,
            erased=tuple(to_erase),
            cancelled=tuple(cancelled),
            in_flight=tuple(in_flight),
            texts_redacted=redacted,
            letters=tuple((r.id, r.message_id) for r in [*letters, *digest_rows]),
        )

    @staticmethod
    def _appeals(conn: Connection, who: Who) -> tuple[AppealToErase, ...]:
        rows = conn.execute(
            select(AP.c.id, AP.c.section, AP.c.campaign, AP.c.erased_at)
            .where(*_matching(who))
            .order_by(AP.c.created_at, AP.c.id)
        ).all()
        if not rows:
            return ()
        states = conn.execute(select(D.c.appeal_id, D.c.state).where(D.c.appeal_id.in_([r.id for r in rows]))).all()

        def count(appeal_id: str, among: Sequence[str]) -> int:
            return sum(1 for s in states if s.appeal_id == appeal_id and s.state in among)

        return tuple(
            AppealToErase(
                appeal_id=r.id,
                section=r.section,
                campaign=r.campaign,
                already_erased=r.erased_at is not None,
                waiting=count(r.id, PENDING),
                in_flight=count(r.id, (State.SENDING,)),
                out=count(r.id, LETTER_OUT),
            )
            for r in rows
        )
