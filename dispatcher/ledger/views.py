"""Typed read models of the ledger: what the API, the CLI and (next) the console show.

Each view is a frozen dataclass; ``as_json()`` gives the public JSON shape where one is
published (``GET /v1/appeals/{id}``, the counters), so the shape is written down once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from dispatcher.ledger.engine import reading
from dispatcher.ledger.states import LETTER_OUT, TERMINAL, WAITING, State
from dispatcher.ledger.tables import AP, DL, A, D


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class SupporterData:
    name: str
    email: str
    city: str | None
    country: str | None
    languages: tuple[str, ...]
    message: str | None
    supporter_ref: str


#: the appeal's columns :func:`supporter_of` reads (by their names)
SUPPORTER_COLUMNS = (
    AP.c.supporter_name,
    AP.c.supporter_email,
    AP.c.supporter_city,
    AP.c.supporter_country,
    AP.c.supporter_languages,
    AP.c.message,
    AP.c.supporter_ref,
)


def supporter_of(row: Any) -> SupporterData | None:
    """The supporter in a row with the appeal's :data:`SUPPORTER_COLUMNS`; None when
    there is no row or the data was purged."""
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


@dataclass(frozen=True)
class TryView:
    number: int
    at: datetime
    outcome: str
    code: str | None

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "at": self.at.isoformat(), "outcome": self.outcome, "code": self.code}


@dataclass(frozen=True)
class AttemptView:
    number: int
    started_at: datetime
    duration_ms: float
    outcome: str
    code: str | None
    text: str | None
    remote_id: str | None
    pages: int | None
    worker: str | None


@dataclass(frozen=True)
class DeliveryView:
    id: str
    appeal_id: str | None
    kind: str
    campaign: str
    section: str
    target: str
    channel: str
    recipient: str
    language: str
    state: State
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    sent_at: datetime | None
    updated_at: datetime
    last_outcome: str | None
    last_code: str | None
    last_text: str | None
    digest_id: str | None
    gateway: str | None
    remote_id: str | None
    pages: int | None
    line_seconds: float | None
    tries: tuple[TryView, ...] = ()
    #: the letter this one stands in for (planned on a fallback channel after that one's bounce)
    replaces: str | None = None

    @classmethod
    def of(cls, r: Any, tries: Sequence[TryView] = ()) -> DeliveryView:
        return cls(
            id=r.id,
            appeal_id=r.appeal_id,
            kind=r.kind,
            campaign=r.campaign,
            section=r.section,
            target=r.target,
            channel=r.channel,
            recipient=r.recipient,
            language=r.language,
            state=State(r.state),
            attempts=r.attempts,
            created_at=r.created_at,
            # only a waiting letter has a next try
            next_attempt_at=r.next_attempt_at if r.state in WAITING else None,
            sent_at=r.sent_at,
            updated_at=r.updated_at,
            last_outcome=r.last_outcome,
            last_code=r.last_code,
            last_text=r.last_text,
            digest_id=r.digest_id,
            gateway=r.gateway,
            remote_id=r.remote_id,
            pages=r.pages,
            line_seconds=r.line_seconds,
            tries=tuple(tries),
            replaces=r.replaces,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "target": self.target,
            "channel": self.channel,
            "language": self.language,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at),
            "sent_at": _iso(self.sent_at),
            "last_outcome": self.last_outcome,
            "last_code": self.last_code,
            "last_text": self.last_text,
            **({"digest": self.digest_id} if self.digest_id else {}),
            **({"replaces": self.replaces} if self.replaces else {}),
            # the far side's facts: its id for the letter, and what a gateway reported (a relay
            # names no gateway, pages or line time)
            "gateway": self.gateway,
            "remote_id": self.remote_id,
            "pages": self.pages,
            "line_seconds": self.line_seconds,
            "tries": [t.as_json() for t in self.tries],
        }


@dataclass(frozen=True)
class AppealView:
    appeal_id: str
    campaign: str
    section: str
    language: str
    client_ref: str | None
    created_at: datetime
    deliveries: tuple[DeliveryView, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "appeal_id": self.appeal_id,
            "campaign": self.campaign,
            "section": self.section,
            "language": self.language,
            "client_ref": self.client_ref,
            "created_at": self.created_at.isoformat(),
            # each letter with its schedule of tries so far
            "deliveries": [d.as_json() for d in self.deliveries],
        }


@dataclass(frozen=True)
class SectionCount:
    appeals: int = 0
    letters_delivered: int = 0


@dataclass(frozen=True)
class Counters:
    campaign: str
    by_section: dict[str, SectionCount]

    @property
    def appeals(self) -> int:
        return sum(c.appeals for c in self.by_section.values())

    @property
    def letters_delivered(self) -> int:
        return sum(c.letters_delivered for c in self.by_section.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "appeals": self.appeals,
            "letters_delivered": self.letters_delivered,
            "by_section": {
                code: {"appeals": c.appeals, "letters_delivered": c.letters_delivered}
                for code, c in sorted(self.by_section.items())
            },
        }


@dataclass(frozen=True)
class DeadLetterView:
    message_id: str
    delivery_id: str | None
    delivery_state: str | None
    queue: str
    actor: str
    reason: str | None
    failed_at: datetime
    recorded_at: datetime


@dataclass(frozen=True)
class Activity:
    """One channel's letters over a window (the console's overview).

    ``sent``: handed to the relay or gateway in the window; ``delivered``: confirmed by the far
    end in the window; ``failed``: ended failed or bounced in the window; ``deferred``: held back
    in the window by our own policy (caps, office hours) or a paused channel, and still waiting
    (a deferral writes no attempt, so this counts letters, not deferrals)."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    deferred: int = 0


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries a listing shows; None matches anything."""

    campaign: str | None = None
    section: str | None = None
    channel: str | None = None
    states: tuple[State, ...] | None = None
    target: str | None = None


@dataclass(frozen=True)
class Page:
    items: tuple[DeliveryView, ...]
    #: pass as ``after`` for the next page; None on the last one
    next_after: str | None
    total: int = field(default=0)


class Views:
    def __init__(self, engine: Engine):
        self.engine = engine
        #: for reads: on SQLite a deferred transaction, which takes no write lock (engine.py)
        self.reads = reading(engine)

    def state_of(self, delivery_id: str) -> State | None:
        with self.reads.connect() as conn:
            state = conn.execute(select(D.c.state).where(D.c.id == delivery_id)).scalar_one_or_none()
        return None if state is None else State(state)

    def delivery(self, delivery_id: str) -> DeliveryView | None:
        with self.reads.connect() as conn:
            row = conn.execute(select(D).where(D.c.id == delivery_id)).one_or_none()
        return None if row is None else DeliveryView.of(row)

    def supporter(self, appeal_id: str) -> SupporterData | None:
        with self.reads.connect() as conn:
            row = conn.execute(select(*SUPPORTER_COLUMNS).where(AP.c.id == appeal_id)).one_or_none()
        return supporter_of(row)

    def appeal(self, appeal_id: str) -> AppealView | None:
        with self.reads.connect() as conn:
            appeal = conn.execute(
                select(AP.c.id, AP.c.campaign, AP.c.section, AP.c.language, AP.c.created_at, AP.c.client_ref).where(
                    AP.c.id == appeal_id
                )
            ).one_or_none()
            if appeal is None:
                return None
            rows = conn.execute(select(D).where(D.c.appeal_id == appeal_id).order_by(D.c.target, D.c.channel)).all()
            tries: dict[str, list[TryView]] = {}
            for t in conn.execute(
                select(A.c.delivery_id, A.c.number, A.c.started_at, A.c.outcome, A.c.code)
                .where(A.c.delivery_id.in_([r.id for r in rows]))
                .order_by(A.c.id)
            ):
                tries.setdefault(t.delivery_id, []).append(TryView(t.number, t.started_at, t.outcome, t.code))
        return AppealView(
            appeal_id=appeal.id,
            campaign=appeal.campaign,
            section=appeal.section,
            language=appeal.language,
            client_ref=appeal.client_ref,
            created_at=appeal.created_at,
            deliveries=tuple(DeliveryView.of(r, tries.get(r.id, ())) for r in rows),
        )

    def deliveries(
        self, where: DeliveryFilter = DeliveryFilter(), *, after: str | None = None, limit: int = 50
    ) -> Page:
        """One page of deliveries matching ``where``, in id order (stable across pages: pass the
        last page's ``next_after`` as ``after``)."""
        conds = []
        for column, value in (
            (D.c.campaign, where.campaign),
            (D.c.section, where.section),
            (D.c.channel, where.channel),
            (D.c.target, where.target),
        ):
            if value is not None:
                conds.append(column == value)
        if where.states is not None:
            conds.append(D.c.state.in_([s.value for s in where.states]))
        with self.reads.connect() as conn:
            total = conn.execute(select(func.count()).select_from(D).where(*conds)).scalar_one()
            query = select(D).where(*conds)
            if after is not None:
                query = query.where(D.c.id > after)
            rows = conn.execute(query.order_by(D.c.id).limit(limit + 1)).all()
        items = tuple(DeliveryView.of(r) for r in rows[:limit])
        return Page(items, items[-1].id if len(rows) > limit else None, total)

    def counters(self, campaign: str) -> Counters:
        with self.reads.connect() as conn:
            appeals = conn.execute(
                select(AP.c.section, func.count()).where(AP.c.campaign == campaign).group_by(AP.c.section)
            ).all()
            letters = conn.execute(
                select(D.c.section, func.count())
                .where(D.c.campaign == campaign, D.c.state.in_(LETTER_OUT), D.c.kind == "letter")
                .group_by(D.c.section)
            ).all()
        counts: dict[str, tuple[int, int]] = {}
        for section, n in appeals:
            counts[section] = (n, counts.get(section, (0, 0))[1])
        for section, n in letters:
            counts[section] = (counts.get(section, (0, 0))[0], n)
        return Counters(campaign, {code: SectionCount(a, d) for code, (a, d) in counts.items()})

    def activity(self, since: datetime, *, sections: Sequence[str] | None = None) -> dict[str, Activity]:
        """Per channel, what happened to letters since ``since`` (:class:`Activity`); only the
        ``sections`` given (None: every section)."""
        scope = [] if sections is None else [D.c.section.in_(list(sections))]
        counts: dict[str, dict[str, int]] = {}
        queries = {
            "sent": select(D.c.channel, func.count()).where(D.c.sent_at >= since, *scope),
            "delivered": select(D.c.channel, func.count()).where(D.c.delivered_at >= since, *scope),
            "failed": select(D.c.channel, func.count()).where(
                D.c.state.in_([State.FAILED.value, State.BOUNCED.value]), D.c.updated_at >= since, *scope
            ),
            "deferred": select(D.c.channel, func.count()).where(
                D.c.state.in_([s.value for s in WAITING]),
                D.c.last_outcome.in_(("deferred", "operational")),
                D.c.updated_at >= since,
                *scope,
            ),
        }
        with self.reads.connect() as conn:
            for name, query in queries.items():
                for channel, n in conn.execute(query.group_by(D.c.channel)):
                    counts.setdefault(channel, {})[name] = n
        return {channel: Activity(**c) for channel, c in sorted(counts.items())}

    def in_hand(self, *, sections: Sequence[str] | None = None) -> dict[State, int]:
        """Letters not yet final, by state (waiting, being sent, sent and awaiting the far end's
        word, bundled into a digest); only the ``sections`` given (None: every section)."""
        scope = [] if sections is None else [D.c.section.in_(list(sections))]
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(D.c.state, func.count())
                .where(D.c.state.not_in([s.value for s in TERMINAL]), *scope)
                .group_by(D.c.state)
            ).all()
        found = {State(state): n for state, n in rows}
        return {state: found[state] for state in State if state in found}

    def dead_letter_count(self) -> int:
        with self.reads.connect() as conn:
            n: int = conn.execute(select(func.count()).select_from(DL)).scalar_one()
        return n

    def attempts(self, delivery_id: str) -> list[AttemptView]:
        with self.reads.connect() as conn:
            rows = conn.execute(select(A).where(A.c.delivery_id == delivery_id).order_by(A.c.id)).all()
        return [
            AttemptView(
                number=r.number,
                started_at=r.started_at,
                duration_ms=round(r.duration_ms, 1),
                outcome=r.outcome,
                code=r.code,
                text=r.text,
                remote_id=r.remote_id,
                pages=r.pages,
                worker=r.worker,
            )
            for r in rows
        ]

    def dead_letters(self, limit: int = 50) -> list[DeadLetterView]:
        """The most recent dead letters, each with its delivery's current state."""
        with self.reads.connect() as conn:
            rows = conn.execute(
                select(DL, D.c.state.label("delivery_state"))
                .select_from(DL.outerjoin(D, D.c.id == DL.c.delivery_id))
                .order_by(DL.c.failed_at.desc())
                .limit(limit)
            ).all()
        return [
            DeadLetterView(
                message_id=r.message_id,
                delivery_id=r.delivery_id,
                delivery_state=r.delivery_state,
                queue=r.queue,
                actor=r.actor,
                reason=r.reason,
                failed_at=r.failed_at,
                recorded_at=r.recorded_at,
            )
            for r in rows
        ]
