"""The ledger's housekeeping: the retention purge of supporters' data, used signatures, dead letters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, not_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dispatcher.ledger.engine import reading
from dispatcher.ledger.lifecycle import Lifecycle, settled
from dispatcher.ledger.tables import AP, DL, US, D

#: the appeal's columns that hold the supporter's personal data (the keyed hash stays: it is no
#: address, and it keeps duplicates and a repeated erasure answerable)
PERSONAL_COLUMNS = (
    "supporter_name",
    "supporter_email",
    "supporter_city",
    "supporter_country",
    "supporter_languages",
    "message",
)


def blanked(now: datetime) -> dict[str, Any]:
    """An appeal row's values with its personal data gone: what the retention purge and an
    erasure (ledger/erasure.py) both write."""
    return {**dict.fromkeys(PERSONAL_COLUMNS), "pii_purged_at": now}


class Housekeeping:
    def __init__(self, engine: Engine, sent_final_after: Mapping[str, timedelta | None]):
        self.engine = engine
        self.reads = reading(engine)
        #: per channel, how long after ``sent`` a letter is settled (None: only by a later report)
        self.sent_final_after = dict(sent_final_after)

    def purge_personal_data(self, now: datetime, retention: timedelta, *, chunk: int = 500) -> int:
        """Blank supporters' personal data once every letter of their appeal is settled (nothing
        more can happen to it: see :func:`dispatcher.ledger.lifecycle.settled`) and the retention
        period has passed since the appeal.

        The candidates are found in a read transaction (``ix_appeal_unpurged`` keeps that to the
        appeals not yet blanked), and each chunk is blanked in a short write transaction that
        checks its letters again: on SQLite a write transaction locks out every worker, and one
        that scanned a large ledger held them for seconds (1.8 s with 500,000 appeals)."""
        cutoff = now - retention
        with self.reads.connect() as conn:
            candidates = list(
                conn.execute(
                    select(AP.c.id).where(AP.c.pii_purged_at.is_(None), AP.c.created_at <= cutoff).order_by(AP.c.id)
                ).scalars()
            )
        purged = 0
        for start in range(0, len(candidates), chunk):
            ids = candidates[start : start + chunk]
            # (digests have no appeal, and only this chunk's letters are asked about)
            unfinished = (
                select(D.c.appeal_id)
                .where(D.c.appeal_id.in_(ids), not_(settled(now, self.sent_final_after)))
                .scalar_subquery()
            )
            with self.engine.begin() as conn:
                purged += conn.execute(
                    update(AP)
                    .where(AP.c.id.in_(ids), AP.c.pii_purged_at.is_(None), AP.c.id.not_in(unfinished))
                    .values(**blanked(now))
                ).rowcount
        return purged

    def forget_signatures(self, older_than: datetime) -> int:
        with self.engine.begin() as conn:
            return conn.execute(delete(US).where(US.c.seen_at < older_than)).rowcount

    def record_dead_letters(self, letters: Sequence[Mapping[str, Any]], now: datetime) -> list[str]:
        """Record queue messages dramatiq gave up on; returns the message ids that were new.

        Idempotent on ``message_id`` (the worker's middleware and the reconciler's sweep may both
        see the same one). A new dead letter whose delivery is still ``queued`` (its claim never
        happened: the usual cause is the database being away) is made due again at once, so the
        reconciler sends it on its next tick instead of after the requeue timeout.
        """
        if not letters:
            return []
        by_id = {letter["message_id"]: letter for letter in letters}
        new: list[str] = []
        dialect = self.engine.dialect.name
        with self.engine.begin() as conn:
            known = set(conn.execute(select(DL.c.message_id).where(DL.c.message_id.in_(list(by_id)))).scalars())
            for message_id, letter in by_id.items():
                if message_id in known:
                    continue
                values = {**letter, "recorded_at": now}
                if dialect in ("postgresql", "sqlite"):
                    # a concurrent recorder of the same message: the first row wins, no error
                    dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
                    inserted = conn.execute(
                        dialect_insert(DL).values(**values).on_conflict_do_nothing(index_elements=["message_id"])
                    ).rowcount
                else:
                    inserted = conn.execute(insert(DL).values(**values)).rowcount
                if not inserted:
                    continue
                new.append(message_id)
                if letter.get("delivery_id"):
                    Lifecycle.withdraw(
                        conn, letter["delivery_id"], now, "its queue message was dead-lettered; released again"
                    )
        return new
