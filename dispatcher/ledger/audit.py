"""The audit log: every operator action, who, when, what, on what, why.

:meth:`Audit.record` takes the caller's connection, so an entry is written in the same
transaction as the action it describes: an action that rolls back leaves no entry, and an entry
never stands for an action that did not happen. Nothing here updates or deletes an entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, insert, select

from dispatcher.ledger.engine import reading
from dispatcher.ledger.tables import AU


@dataclass(frozen=True)
class AuditView:
    id: int
    at: datetime
    actor: str
    action: str
    target_kind: str
    target_id: str
    section: str | None
    reason: str | None
    detail: str | None


class Audit:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.reads = reading(engine)

    @staticmethod
    def record(
        conn: Connection,
        *,
        actor: str,
        action: str,
        target_kind: str,
        target_id: str,
        now: datetime,
        section: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        conn.execute(
            insert(AU).values(
                at=now,
                actor=actor,
                action=action,
                target_kind=target_kind,
                target_id=target_id,
                section=section,
                reason=reason,
                detail=detail,
            )
        )

    def entry(self, entry_id: int) -> AuditView | None:
        with self.reads.connect() as conn:
            row = conn.execute(select(AU).where(AU.c.id == entry_id)).one_or_none()
        return None if row is None else AuditView(**row._mapping)

    def entries(
        self,
        *,
        sections: Sequence[str] | None = None,
        target_id: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[AuditView]:
        """Newest first. ``sections`` limits to those sections' entries (an operator scoped to
        them); cross-section entries (``section`` empty) are shown only when it is None."""
        query = select(AU).order_by(AU.c.id.desc()).limit(limit)
        if sections is not None:
            query = query.where(AU.c.section.in_(list(sections)))
        if target_id is not None:
            query = query.where(AU.c.target_id == target_id)
        if before_id is not None:
            query = query.where(AU.c.id < before_id)
        with self.reads.connect() as conn:
            return [AuditView(**r._mapping) for r in conn.execute(query)]
