"""An operator's hand on one letter: retry now, cancel, hand back.

Each action is one transaction that makes one move of the state table (the operator events of
:mod:`dispatcher.ledger.states`) through :func:`dispatcher.ledger.lifecycle.move` and writes its
audit entry, so an action is on record exactly when it happened. Each is a compare-and-set on the
state the operator saw (``expected``): a letter that moved meanwhile (a worker claimed it, its
report came) is left alone and the action is refused, saying what the letter is now.

A retried or handed-back letter is ``queued`` when the transaction commits; the caller puts its
message on the queue (the ledger knows no queue) and, should the queue refuse, withdraws it to
``planned``, due now, for the reconciler to send — as intake does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, insert, select

from dispatcher.errors import DispatchError
from dispatcher.ledger.audit import Audit
from dispatcher.ledger.lifecycle import CANCELLED_OUTCOME, move_one
from dispatcher.ledger.states import TRANSITIONS, Event, State
from dispatcher.ledger.tables import AP, CC, SU, A, D

E = Event


class ActionRefused(DispatchError):
    """The action was not taken; ``str()`` says why, for the operator."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        #: not_found, moved, not_allowed, closed, deadline, erased, suppressed, digest
        self.code = code


@dataclass(frozen=True)
class Done:
    """An action taken: the letter's state before and after."""

    delivery_id: str
    action: str
    before: State
    after: State
    #: the letter goes on the queue now (the caller sends its message)
    enqueue: bool

    @property
    def detail(self) -> str:
        return f"{self.before} → {self.after}"


@dataclass(frozen=True)
class _Letter:
    """What an action reads of a letter before its compare-and-set."""

    id: str
    state: str
    kind: str
    digest_id: str | None
    appeal_id: str | None
    campaign: str
    section: str
    channel: str
    recipient: str
    claimed_by: str | None
    claimed_at: datetime | None
    attempts: int


#: audit action names (models.AuditEntry.action)
RETRY, CANCEL, HAND_BACK = "letter.retry", "letter.cancel", "letter.hand_back"


def sources_of(action: str) -> frozenset[State]:
    """The states a letter may be in for ``action`` (what the console offers it for)."""
    return TRANSITIONS[_EVENTS[action]].sources


_EVENTS = {RETRY: E.OPERATOR_RETRY, CANCEL: E.OPERATOR_CANCEL, HAND_BACK: E.OPERATOR_HAND_BACK}


class LetterActions:
    def __init__(self, engine: Engine):
        self.engine = engine

    def retry_now(
        self,
        delivery_id: str,
        *,
        actor: str,
        reason: str,
        now: datetime,
        deadline: datetime,
        expected: State | str | None = None,
    ) -> Done:
        """Send the letter again now: a failed or bounced one (it gets one more try: the retry
        counter goes on, so a transient failure after an exhausted letter's retry fails it again),
        or one waiting in backoff (it becomes due now). Refused when its campaign is closed or
        ``deadline`` (the campaign's, for the letter's section) has passed, when the supporter's
        data is gone (erased or purged: the letter cannot be written again), when its address is
        still suppressed, and for digests and their letters (retry the digest's route instead)."""
        with self.engine.begin() as conn:
            row = self._row(conn, delivery_id)
            start = self._start(row, RETRY, expected)
            if row.kind != "letter" or row.digest_id is not None:
                raise ActionRefused("a digest and the letters in one are not retried one by one", code="digest")
            closed = conn.execute(select(CC.c.reason).where(CC.c.campaign == row.campaign)).first()
            if closed is not None:
                raise ActionRefused(f"campaign {row.campaign} is closed: {closed.reason}", code="closed")
            if now >= deadline:
                raise ActionRefused(
                    f"campaign {row.campaign} ended for section {row.section} at {deadline.isoformat()}",
                    code="deadline",
                )
            appeal = conn.execute(
                select(AP.c.supporter_name, AP.c.pii_purged_at).where(AP.c.id == row.appeal_id)
            ).one_or_none()
            if appeal is None or appeal.supporter_name is None:
                raise ActionRefused(
                    "the supporter's data was erased or purged: the letter cannot be written again", code="erased"
                )
            suppressed = conn.execute(
                select(SU.c.reason).where(SU.c.channel == row.channel, SU.c.address == row.recipient.strip().lower())
            ).first()
            if suppressed is not None:
                raise ActionRefused(
                    f"the address is suppressed ({suppressed.reason}): remove the suppression first "
                    f"(dispatcher suppressions remove ADDRESS)",
                    code="suppressed",
                )
            after = move_one(
                conn,
                E.OPERATOR_RETRY,
                D.c.id == delivery_id,
                sources=start,
                values={
                    "next_attempt_at": now,
                    "queued_at": now,
                    "updated_at": now,
                    "last_text": f"retried by {actor}: {reason}",
                },
            )
            return self._done(conn, row, RETRY, after, actor=actor, reason=reason, now=now)

    def cancel(
        self, delivery_id: str, *, actor: str, reason: str, now: datetime, expected: State | str | None = None
    ) -> Done:
        """Cancel a waiting letter (planned or queued) with the operator's reason; a message of it
        still on the queue then finds nothing to claim."""
        with self.engine.begin() as conn:
            row = self._row(conn, delivery_id)
            start = self._start(row, CANCEL, expected)
            after = move_one(
                conn,
                E.OPERATOR_CANCEL,
                D.c.id == delivery_id,
                sources=start,
                values={
                    "updated_at": now,
                    "last_outcome": CANCELLED_OUTCOME,
                    "last_text": f"cancelled by {actor}: {reason}",
                },
            )
            return self._done(conn, row, CANCEL, after, actor=actor, reason=reason, now=now)

    def hand_back(
        self,
        delivery_id: str,
        *,
        actor: str,
        reason: str,
        now: datetime,
        expected: State | str | None = None,
    ) -> Done:
        """Take a letter stuck in ``sending`` from its worker and queue it again, with a transient
        attempt on record, as the reconciler releases a dead worker's claim. Compare-and-set on the
        claim the letter holds now: a worker that then finishes the send records its try, but moves
        nothing. If that worker was alive and the relay had accepted the letter, it goes twice (the
        same Message-ID): hand back only a letter whose worker is gone or hung."""
        with self.engine.begin() as conn:
            row = self._row(conn, delivery_id)
            start = self._start(row, HAND_BACK, expected)
            after = move_one(
                conn,
                E.OPERATOR_HAND_BACK,
                D.c.id == delivery_id,
                D.c.claimed_by == row.claimed_by if row.claimed_by is not None else D.c.claimed_by.is_(None),
                sources=start,
                values={
                    "claimed_by": None,
                    "claimed_at": None,
                    "queued_at": now,
                    "next_attempt_at": now,
                    "updated_at": now,
                    "last_outcome": "transient",
                    "last_text": f"handed back by {actor} (claim of {row.claimed_by}): {reason}",
                },
            )
            if after is not None:
                started = row.claimed_at or now
                conn.execute(
                    insert(A).values(
                        delivery_id=delivery_id,
                        number=row.attempts,
                        started_at=started,
                        duration_ms=max((now - started).total_seconds(), 0.0) * 1000.0,
                        outcome="transient",
                        code=None,
                        text=f"handed back by operator {actor} mid-send (the letter may have gone out)",
                        worker=row.claimed_by,
                    )
                )
            return self._done(conn, row, HAND_BACK, after, actor=actor, reason=reason, now=now)

    # ------------------------------------------------------------------ shared

    @staticmethod
    def _row(conn: Connection, delivery_id: str) -> _Letter:
        row = conn.execute(
            select(
                D.c.id,
                D.c.state,
                D.c.kind,
                D.c.digest_id,
                D.c.appeal_id,
                D.c.campaign,
                D.c.section,
                D.c.channel,
                D.c.recipient,
                D.c.claimed_by,
                D.c.claimed_at,
                D.c.attempts,
            ).where(D.c.id == delivery_id)
        ).one_or_none()
        if row is None:
            raise ActionRefused(f"no letter {delivery_id}", code="not_found")
        return _Letter(**row._mapping)

    @staticmethod
    def _start(row: _Letter, action: str, expected: State | str | None) -> list[State]:
        """The compare-and-set's source: the state the operator saw, if it still is the letter's."""
        now_in = State(row.state)
        allowed = sources_of(action)
        seen = State(expected) if expected is not None else now_in
        if seen != now_in:
            raise ActionRefused(f"the letter moved meanwhile: it was {seen}, it is {now_in} now", code="moved")
        if now_in not in allowed:
            raise ActionRefused(
                f"a {now_in} letter cannot be {_VERB[action]} (only {', '.join(sorted(allowed))})",
                code="not_allowed",
            )
        return [now_in]

    @staticmethod
    def _done(
        conn: Connection, row: _Letter, action: str, after: State | None, *, actor: str, reason: str, now: datetime
    ) -> Done:
        if after is None:
            # the compare-and-set found the letter in another state (or under another claim)
            state = conn.execute(select(D.c.state).where(D.c.id == row.id)).scalar_one()
            raise ActionRefused(f"the letter moved meanwhile: it is {state} now", code="moved")
        done = Done(row.id, action, State(row.state), after, enqueue=after == State.QUEUED)
        Audit.record(
            conn,
            actor=actor,
            action=action,
            target_kind="letter",
            target_id=row.id,
            now=now,
            section=row.section,
            reason=reason,
            detail=done.detail,
        )
        return done


_VERB = {RETRY: "retried", CANCEL: "cancelled", HAND_BACK: "handed back"}
