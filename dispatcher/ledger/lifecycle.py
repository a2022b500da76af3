"""A letter's life in the ledger: the one writer of a delivery's state, and every move built on it.

:func:`move` makes a move: it takes an :class:`Event`, looks it up in
:data:`dispatcher.ledger.states.TRANSITIONS` and writes it as one compare-and-set (``... WHERE
state IN (<the event's sources>)``) built by ``_compare_and_set``, the only code that writes
``deliveries.state`` (the claim and the release to the queue use it directly, to fold a check
into the same statement on the hot paths). So a redelivered queue
message, a second worker, a late webhook or a reconciler racing a worker can never make a move
the table does not list, nor make one twice. Asking for a move the table does not have (a
source the event may not start from) raises :class:`IllegalTransition` before any SQL runs.

A closed campaign's letter never goes back to waiting, nor does the letter of a supporter whose
data was erased: a move that would bring one from a worker's hands or from ``sent`` back to
planned, queued or bundled cancels it instead, in the same statement, whatever the section.

New deliveries start in :func:`dispatcher.ledger.states.initial` (:func:`planned_values`), or,
when the transaction that writes them also releases them to the queue, in the release's target
(:func:`released_values`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.elements import ColumnElement

from dispatcher.errors import DispatchError
from dispatcher.ledger.engine import ThreadConnections, new_id
from dispatcher.ledger.prepared import Prepared, PreparedRow
from dispatcher.ledger.states import (
    DIGEST_FOLLOWS,
    PENDING,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    initial,
)
from dispatcher.ledger.tables import AP, CC, A, D
from dispatcher.ledger.views import SUPPORTER_COLUMNS, SupporterData, supporter_of

E = Event

#: the outcome word recorded for a delivery a closed campaign (or an erasure) cancels
CANCELLED_OUTCOME = "cancelled"
#: the last text of a letter cancelled because its supporter's data was erased
ERASED_TEXT = "erased"


def _sources(event: Event, sources: Iterable[State] | None) -> frozenset[State]:
    rule = TRANSITIONS[event]
    if not rule.sources:
        raise IllegalTransition(event, None)
    start = rule.sources if sources is None else frozenset(State(s) for s in sources)
    illegal = start - rule.sources
    if illegal:
        raise IllegalTransition(event, sorted(illegal)[0])
    return start


def _compare_and_set(
    event: Event,
    *where: ColumnElement[bool],
    sources: Iterable[State] | None = None,
    values: Mapping[str, Any] | None = None,
    also: ColumnElement[bool] | None = None,
) -> Update:
    """The one statement of ``event``'s move, and the only code that writes a state: ``UPDATE
    ... SET state = <its target> WHERE ... AND state IN (<its sources>)``. ``values`` may hold a
    ``state`` that is a choice between table targets (the closed-campaign guard below).
    ``also`` matches further rows that keep their state while the statement sets their other
    ``values`` (a release stamps ``queued_at`` on a letter a worker already holds)."""
    start = _sources(event, sources)
    target = TRANSITIONS[event].target
    in_start = _state_in(start)
    if also is None:
        return update(D).where(in_start, *where).values(**{"state": target, **(values or {})})
    state = case((in_start, target.value), else_=D.c.state)
    return update(D).where(or_(in_start, also), *where).values(**{"state": state, **(values or {})})


#: an attempt row, values bound at execution
_INSERT_ATTEMPT = insert(A)
#: the columns the worker's attempt row is given (the finish's)
_ATTEMPT_KEYS = (
    "delivery_id",
    "number",
    "started_at",
    "duration_ms",
    "outcome",
    "code",
    "text",
    "worker",
    "remote_id",
    "pages",
)


@functools.lru_cache(maxsize=64)
def _state_in(states: frozenset[State]) -> ColumnElement[bool]:
    """``state = 'a' OR state = 'b'``: equalities, not an expanding IN, so that a statement's SQL
    stays the same from one call to the next (compiled once, one entry in the database's
    statement cache); built once per set of states (these clauses are immutable)."""
    return or_(*(D.c.state == s.value for s in sorted(states)))


#: the letter's campaign was closed (campaign_closures holds a few rows at most)
_CLOSED = D.c.campaign.in_(select(CC.c.campaign))
#: the letter's supporter had their data erased (a primary-key probe of its appeal)
_ERASED = exists().where(AP.c.id == D.c.appeal_id, AP.c.erased_at.is_not(None))
# Spelt out: SQLAlchemy writes SQLite's RETURNING with every column unqualified, and in the
# subquery an unqualified "appeal_id" would be the delivery's only while appeals has no such column.
_CLAIMED_APPEAL = AP.alias("claimed_appeal")
_DELIVERY_APPEAL: ColumnElement[str] = literal_column(f"{D.name}.{D.c.appeal_id.name}")

#: states a letter is in while it is out of the ledger's waiting states: a worker holds it, or its
#: channel accepted it and its report may still send it back
_OUT = frozenset({State.SENDING, State.SENT})


def _unless_closed(target: State, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` for a move back to waiting that cancels the letter instead when its campaign
    was closed meanwhile, or its supporter's data erased: one statement, so no window between
    the check and the move."""
    reason = select(CC.c.reason).where(CC.c.campaign == D.c.campaign).scalar_subquery()
    ended = or_(_CLOSED, _ERASED)
    return {
        **values,
        "state": case((ended, State.CANCELLED.value), else_=target.value),
        "last_outcome": case((ended, CANCELLED_OUTCOME), else_=values.get("last_outcome", D.c.last_outcome)),
        "last_text": case(
            (_CLOSED, literal("campaign closed: ") + func.coalesce(reason, "")),
            (_ERASED, literal(ERASED_TEXT)),
            else_=values.get("last_text", D.c.last_text),
        ),
    }


def move(
    conn: Connection,
    event: Event,
    *where: ColumnElement[bool],
    sources: Iterable[State] | None = None,
    values: Mapping[str, Any] | None = None,
) -> int:
    """Make ``event``'s move for every delivery matching ``where`` that is in one of its source
    states (or of ``sources``, a subset of them); returns how many moved (including those a
    closed campaign cancelled instead)."""
    return conn.execute(_guarded(event, where, sources, values)).rowcount


def move_one(
    conn: Connection,
    event: Event,
    *where: ColumnElement[bool],
    sources: Iterable[State] | None = None,
    values: Mapping[str, Any] | None = None,
) -> State | None:
    """:func:`move` for one delivery: the state it is in now, or None if it did not move."""
    row = conn.execute(_guarded(event, where, sources, values).returning(D.c.state)).first()
    return None if row is None else State(row.state)


def _guarded(
    event: Event,
    where: Sequence[ColumnElement[bool]],
    sources: Iterable[State] | None,
    values: Mapping[str, Any] | None,
) -> Update:
    if not where:
        raise ValueError("a move names the deliveries it applies to")
    start = _sources(event, sources)
    target = TRANSITIONS[event].target
    given = dict(values or {})
    if target in PENDING and start & _OUT:
        # A campaign closed (or the supporter's data erased) while the letter was out of the
        # waiting states (being sent, or sent and then reported failed): it does not wait again,
        # it is cancelled. (Closing and erasing cancel the letters that were waiting; a letter
        # planned since is cancelled by the worker that claims it.)
        assert start <= TRANSITIONS[E.CANCELLED].sources
        given = _unless_closed(target, given)
    return _compare_and_set(event, *where, sources=start, values=given)


def in_sending_digest() -> ColumnElement[bool]:
    """The letter is bundled into a digest that a worker holds (being sent now)."""
    digest = D.alias("digest")
    return exists().where(digest.c.id == D.c.digest_id, digest.c.state == State.SENDING.value)


def one(delivery_id: str) -> ColumnElement[bool]:
    return D.c.id == delivery_id


def among(ids: Sequence[str]) -> ColumnElement[bool]:
    return D.c.id.in_(list(ids))


def planned_values(**fields: Any) -> dict[str, Any]:
    """The row of a new delivery: the table's initial state, no tries yet, not queued."""
    return {**fields, "state": initial(), "attempts": 0, "queued_at": None}


def released_values(row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """A new delivery's row (:func:`planned_values`) released to the queue before it is written:
    the row the release (:meth:`Lifecycle.release`) would leave, for a letter that the
    transaction creating it also releases (intake).

    Why not insert it planned and release it: the UPDATE wrote a second version of every row
    of the batch (on PostgreSQL a dead tuple and new index entries per letter), a quarter of
    the intake writer's time on PostgreSQL (bench/intake.py)."""
    event = TRANSITIONS[E.RELEASED]
    if row["state"] not in event.sources:
        raise IllegalTransition(E.RELEASED, row["state"], row.get("id"))
    return {**row, "state": event.target, "queued_at": now, "updated_at": now}


def mirror_digest(conn: Connection, digest_id: str, now: datetime, values: Mapping[str, Any] | None = None) -> int:
    """A digest's letters follow it: sent, delivered, failed or bounced with it, bundled again while
    it waits for another try, expired or cancelled with it."""
    state = conn.execute(select(D.c.state).where(D.c.id == digest_id)).scalar_one_or_none()
    if state is None or State(state) not in DIGEST_FOLLOWS:
        return 0  # queued, sending, bundled: nothing its letters need to know
    copied = {k: v for k, v in (values or {}).items() if k in ("sent_at", "delivered_at", "last_outcome", "last_code")}
    text = (values or {}).get("last_text")
    return move(
        conn,
        DIGEST_FOLLOWS[State(state)],
        D.c.digest_id == digest_id,
        sources=TRANSITIONS[DIGEST_FOLLOWS[State(state)]].sources & {State.BUNDLED, State.SENT},
        values={
            "updated_at": now,
            "last_text": f"in digest {digest_id}: {text}" if text else f"in digest {digest_id}",
            **copied,
        },
    )


@functools.cache
def _release_statement() -> Update:
    """The release to the queue, built once (the intake's and the reconciler's path)."""
    now = bindparam("p_now", type_=D.c.updated_at.type)
    return _compare_and_set(
        E.RELEASED,
        D.c.id.in_(bindparam("p_ids", expanding=True)),
        values={"queued_at": func.coalesce(D.c.queued_at, now), "updated_at": now},
        also=D.c.queued_at.is_(None),
    )


#: the states a letter leaves for good with another letter planned in its place
_REPLANNED = frozenset({State.BOUNCED, State.REROUTED})


def _replan(conn: Connection, delivery_id: str, replan: Replan, now: datetime) -> bool:
    """Plan ``replan`` in place of ``delivery_id``: same appeal, target and language, another
    channel; linked by ``replaces``. Never a second letter on a channel the appeal already has
    for that target (one letter per target and channel), and never for a digest."""
    old = conn.execute(
        select(D.c.appeal_id, D.c.campaign, D.c.section, D.c.target, D.c.language, D.c.message_id).where(
            D.c.id == delivery_id
        )
    ).one()
    if old.appeal_id is None:
        return False
    erased = conn.execute(select(AP.c.erased_at).where(AP.c.id == old.appeal_id)).scalar_one_or_none()
    if erased is not None:
        return False  # the supporter's data was erased: no new letter in its name
    taken = conn.execute(
        select(D.c.id).where(D.c.appeal_id == old.appeal_id, D.c.target == old.target, D.c.channel == replan.channel)
    ).first()
    if taken is not None:
        return False
    domain = old.message_id.rpartition("@")[2].rstrip(">")
    conn.execute(
        insert(D).values(
            **planned_values(
                id=replan.id,
                appeal_id=old.appeal_id,
                campaign=old.campaign,
                section=old.section,
                target=old.target,
                channel=replan.channel,
                recipient=replan.recipient,
                language=old.language,
                next_attempt_at=now,
                message_id=f"<{replan.id}@{domain}>",
                created_at=now,
                updated_at=now,
                replaces=delivery_id,
            )
        )
    )
    return True


@dataclass(frozen=True)
class Claim:
    """What a worker holds while it sends one letter."""

    id: str
    #: None for a digest
    appeal_id: str | None
    campaign: str
    section: str
    target: str
    channel: str
    recipient: str
    language: str
    message_id: str
    attempt: int
    queued_at: datetime | None
    created_at: datetime | None = None
    #: "letter" or "digest"
    kind: str = "letter"
    #: when this claim was taken: with the worker, what tells it from a later claim of the same
    #: worker on the same letter (after this one was taken back as stale)
    claimed_at: datetime | None = None
    #: the appeal's supporter, read by the claim's own statement; None for a digest, or when the
    #: supporter's data was purged
    supporter: SupporterData | None = None


@dataclass(frozen=True)
class Replan:
    """A letter planned on another channel in place of one refused for good (a route's
    fallback): written in the same transaction as the refused letter's move, so neither can be
    recorded without the other."""

    channel: str
    recipient: str
    #: the new letter's id, chosen by the caller so that it can log it
    id: str = field(default_factory=lambda: new_id("dl"))


@dataclass(frozen=True)
class Result:
    """What became of one try, as the worker or a late report records it."""

    event: Event
    #: the outcome class as operators read it: sent, transient, permanent, deferred, operational, ...
    outcome: str
    code: int | str | None = None
    text: str | None = None
    next_attempt_at: datetime | None = None
    remote_id: str | None = None
    #: False for a deferral or an operational pause: the try does not count towards the cap
    counts_as_try: bool = True
    gateway: str | None = None
    pages: int | None = None
    line_seconds: float | None = None
    #: with ``bounced`` or ``rerouted``: the letter that takes this one's place
    replan: Replan | None = None

    @property
    def state(self) -> State:
        return TRANSITIONS[self.event].target


def _outcome_values(outcome: Result, now: datetime) -> dict[str, Any]:
    target = outcome.state
    values: dict[str, Any] = {
        "updated_at": now,
        "last_outcome": outcome.outcome,
        "last_code": None if outcome.code is None else str(outcome.code),
        "last_text": outcome.text,
    }
    if target in (State.SENT, State.DELIVERED):
        values["sent_at"] = now
    if target == State.DELIVERED:
        values["delivered_at"] = now
    if outcome.next_attempt_at is not None:
        values["next_attempt_at"] = outcome.next_attempt_at
    for key in ("remote_id", "gateway", "pages", "line_seconds"):
        value = getattr(outcome, key)
        if value is not None:
            values[key] = value
    if not outcome.counts_as_try:
        values["attempts"] = D.c.attempts - 1
    return values


T = TypeVar("T")


def _once_more_if_disconnected(transaction: Callable[[bool], T]) -> T:
    """``transaction(False)``, and ``transaction(True)`` if its connection was found dead
    (SQLAlchemy then invalidated it, and every connection pooled before it: the second try gets
    a fresh one). Only for a compare-and-set, which a second run cannot apply twice."""
    try:
        return transaction(False)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return transaction(True)


def _recorded_try(conn: Connection, claim: Claim, worker: str, started_at: datetime) -> tuple[str, datetime] | None:
    """The letter's state and ``updated_at`` if this try's attempt row is there: a finish whose
    connection died had committed all the same (only the answer to its COMMIT was lost)."""
    row = conn.execute(
        select(D.c.state, D.c.updated_at).where(
            D.c.id == claim.id,
            exists().where(
                A.c.delivery_id == claim.id,
                A.c.number == claim.attempt,
                A.c.worker == worker,
                A.c.started_at == started_at,
            ),
        )
    ).first()
    return None if row is None else (row.state, row.updated_at)


class Lifecycle:
    """The moves of a letter's life: claims, outcomes, late reports, hand-backs, releases to the
    queue, expiry, closing, digests. Every method is one transaction."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._finishes: dict[tuple[Event, bool, bool, bool], Prepared] = {}
        postgresql = engine.dialect.name == "postgresql"
        #: the attempt row and the finish in one statement (data-modifying WITH: PostgreSQL)
        self._attempt_in_finish = postgresql
        #: PostgreSQL: connections on which each statement is a transaction of its own
        #: (autocommit), for the worker's transactions of one statement. psycopg sends BEGIN and
        #: COMMIT as round trips of their own: four of a letter's six, without this.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT") if postgresql else None
        #: a worker's threads keep their connections between letters (:meth:`keep_connections`)
        self._kept: ThreadConnections | None = None
        # The worker's hottest statement, built once: UPDATE ... RETURNING (SQLite >= 3.35,
        # PostgreSQL), the closed-campaign check included (a NOT IN on a table of a few rows).
        now = bindparam("p_now", type_=D.c.claimed_at.type)
        self._claim = _compare_and_set(
            E.CLAIMED,
            D.c.id == bindparam("p_delivery_id"),
            # A queued letter was released already: no second guess with this worker's clock,
            # which may run behind the releasing machine's. A planned one (a retry, a deferral)
            # must be due.
            or_(D.c.state == State.QUEUED, D.c.next_attempt_at <= now),
            ~_CLOSED,
            values={
                "claimed_by": bindparam("p_worker"),
                "claimed_at": now,
                "attempts": D.c.attempts + 1,
                "updated_at": now,
            },
        ).returning(
            D.c.id,
            D.c.appeal_id,
            D.c.campaign,
            D.c.section,
            D.c.target,
            D.c.channel,
            D.c.recipient,
            D.c.language,
            D.c.message_id,
            D.c.attempts,
            D.c.queued_at,
            D.c.created_at,
            D.c.kind,
            D.c.claimed_at,
            # The supporter the worker reads next, in the same statement (one round trip and one
            # transaction less per letter): scalar subqueries, since RETURNING takes no join.
            *(
                select(_CLAIMED_APPEAL.c[column.name])
                .where(_CLAIMED_APPEAL.c.id == _DELIVERY_APPEAL)
                .scalar_subquery()
                .label(column.name)
                for column in SUPPORTER_COLUMNS
            ),
        )
        # The worker's three statements, compiled once for this database (prepared.py).
        self._prepared_claim = Prepared(self._claim, engine.dialect)
        self._prepared_attempt = Prepared(_INSERT_ATTEMPT, engine.dialect, _ATTEMPT_KEYS)

    # ------------------------------------------------------------------ the worker's path

    def claim(self, delivery_id: str, worker: str, now: datetime) -> Claim | None:
        """Take a waiting, due delivery for sending; None if it is not ours to send. A letter
        of a closed campaign is cancelled instead of claimed (an appeal accepted while its
        campaign was being closed; on PostgreSQL, a move that raced the close).

        A connection found dead fails the claim's transaction: it is tried once more on a fresh
        one (a compare-and-set: it takes the letter once at most). Should the first try have
        committed and only its answer been lost, the second finds the letter taken and answers
        None: the letter waits for the stale-claim sweep, then goes out once."""
        row = _once_more_if_disconnected(lambda _again: self._claim_row(delivery_id, worker, now))
        if row is None:
            return None
        return Claim(
            id=row.id,
            appeal_id=row.appeal_id,
            campaign=row.campaign,
            section=row.section,
            target=row.target,
            channel=row.channel,
            recipient=row.recipient,
            language=row.language,
            message_id=row.message_id,
            attempt=row.attempts,
            queued_at=row.queued_at,
            created_at=row.created_at,
            kind=row.kind,
            claimed_at=row.claimed_at,
            supporter=supporter_of(row),
        )

    def keep_connections(self) -> None:
        """From now on each thread keeps its connection for the claim and the finish (a worker:
        :class:`dispatcher.ledger.engine.ThreadConnections`) until :meth:`release_connections`
        (a Service builds one worker: its actor is registered once)."""
        if self._kept is None:
            self._kept = ThreadConnections(self._autocommit or self.engine)

    def release_connections(self) -> None:
        """Give the kept connections back to the pool (the worker's threads are done)."""
        if self._kept is not None:
            self._kept.close()

    @contextmanager
    def _worker_transaction(self, *, one_statement: bool) -> Iterator[Connection]:
        """The claim's or the finish's transaction; on PostgreSQL a statement alone runs in
        autocommit. On the thread's kept connection, if it keeps one."""
        autocommit = one_statement and self._autocommit is not None
        # (PostgreSQL's kept connections are autocommit ones: a transaction of several
        # statements, a digest's or a replacement letter's, takes a pooled connection)
        kept = self._kept
        conn = kept.get() if kept is not None and (self._autocommit is None or autocommit) else None
        if kept is None or conn is None:
            with self._autocommit.connect() if autocommit and self._autocommit else self.engine.begin() as pooled:
                yield pooled
            return
        try:
            if autocommit:
                yield conn
            else:
                with conn.begin():
                    yield conn
        except BaseException:
            kept.drop(conn)
            raise

    def _claim_row(self, delivery_id: str, worker: str, now: datetime) -> PreparedRow | None:
        with self._worker_transaction(one_statement=True) as conn:
            rows = self._prepared_claim.run(conn, {"p_delivery_id": delivery_id, "p_now": now, "p_worker": worker})
            if not rows:
                # Not ours: sent already, held by another worker, not due — or its campaign was
                # closed, and then it is cancelled here rather than left waiting for ever (a
                # compare-and-set of its own: on PostgreSQL, a transaction of its own).
                self.cancel_closed(conn, delivery_id, now)
                return None
            return rows[0]

    def finish(
        self, claim: Claim, outcome: Result, *, worker: str, started_at: datetime, now: datetime
    ) -> State | None:
        """Record one try and move the delivery out of 'sending'. Returns the state it moved to
        (``cancelled`` rather than waiting again when its campaign was closed meanwhile), or
        None when the claim was no longer ours (a reconciler took it back); the attempt is
        recorded either way, because it happened.

        A connection found dead fails the transaction: it is tried once more on a fresh one. The
        letter may have gone out already, and a finish left undone would leave it claimed until
        the stale-claim sweep sent it again. The second try is safe: the move is a
        compare-and-set on this claim, and the attempt row is not written twice should the
        first try have committed with only its answer lost.
        """
        _sources(outcome.event, [State.SENDING])  # refuse an outcome that cannot end a send, up front
        code = None if outcome.code is None else str(outcome.code)
        params: dict[str, Any] = {
            "p_delivery_id": claim.id,
            "p_worker": worker,
            "p_claimed_at": claim.claimed_at,
            "p_now": now,
            "p_outcome": outcome.outcome,
            "p_code": code,
            "p_text": outcome.text,
            "p_next_attempt_at": outcome.next_attempt_at,
            "p_remote_id": outcome.remote_id,
            "p_gateway": outcome.gateway,
            "p_pages": outcome.pages,
            "p_line_seconds": outcome.line_seconds,
        }
        # A deferral is not a try (the letter was held back by our own policy): no attempt row.
        tried = outcome.outcome != "deferred"
        attempt: dict[str, Any] = {
            "delivery_id": claim.id,
            "number": claim.attempt,
            "started_at": started_at,
            "duration_ms": (now - started_at).total_seconds() * 1000.0,
            "outcome": outcome.outcome,
            "code": code,
            "text": outcome.text,
            "worker": worker,
            "remote_id": outcome.remote_id,
            "pages": outcome.pages,
        }
        # PostgreSQL: the attempt row in the finish's own statement (a WITH ... INSERT), one
        # round trip; SQLite takes no INSERT in a WITH, so there it goes first, in the same
        # transaction.
        together = tried and self._attempt_in_finish
        if together:
            params.update({f"a_{key}": value for key, value in attempt.items()})
        statement = self._finish_statement(
            outcome.event, outcome.counts_as_try, claim.claimed_at is not None, with_attempt=together
        )
        # one statement, unless the letter's digest or its replacement follow it
        alone = (tried == together) and claim.kind == "letter" and not (outcome.replan and outcome.state in _REPLANNED)

        def record(again: bool) -> State | None:
            with self._worker_transaction(one_statement=alone and not again) as conn:
                if again and tried:
                    recorded = _recorded_try(conn, claim, worker, started_at)
                    if recorded is not None:
                        # Moved by it (the row still bears its time), or the claim had been
                        # taken back, or the letter moved since: what the first try returned.
                        state, updated_at = recorded
                        return State(state) if updated_at == now else None
                if tried and not together:
                    self._prepared_attempt.run(conn, attempt)
                rows = statement.run(conn, params)
                moved = State(rows[0].state) if rows else None
                if moved and claim.kind == "digest":
                    mirror_digest(conn, claim.id, now, _outcome_values(outcome, now))
                if moved in _REPLANNED and outcome.replan is not None:
                    _replan(conn, claim.id, outcome.replan, now)
            return moved

        return _once_more_if_disconnected(record)

    def _finish_statement(
        self, event: Event, counts_as_try: bool, by_claim_time: bool, *, with_attempt: bool = False
    ) -> Prepared:
        """The finish of a send with ``event``, built once per kind of outcome (the worker's
        second-hottest statement): every value a bound parameter. ``with_attempt``: the try's
        attempt row is inserted by the same statement (``a_<column>`` parameters; PostgreSQL)."""
        key = (event, counts_as_try, by_claim_time, with_attempt)
        found = self._finishes.get(key)
        if found is not None:
            return found
        target = TRANSITIONS[event].target
        now = bindparam("p_now", type_=D.c.updated_at.type)
        values: dict[str, Any] = {
            "claimed_by": None,
            "claimed_at": None,
            "updated_at": now,
            "last_outcome": bindparam("p_outcome", type_=D.c.last_outcome.type),
            "last_code": bindparam("p_code", type_=D.c.last_code.type),
            "last_text": bindparam("p_text", type_=D.c.last_text.type),
            "next_attempt_at": func.coalesce(
                bindparam("p_next_attempt_at", type_=D.c.next_attempt_at.type), D.c.next_attempt_at
            ),
        }
        if target in (State.SENT, State.DELIVERED):
            values["sent_at"] = now
        if target == State.DELIVERED:
            values["delivered_at"] = now
        for key_ in ("gateway", "pages", "line_seconds"):
            column = D.c[key_]
            values[key_] = func.coalesce(bindparam(f"p_{key_}", type_=column.type), column)
        if counts_as_try:
            # the far side's id of *this* try (none if it named none): a report about an earlier
            # try must not settle this one
            values["remote_id"] = bindparam("p_remote_id", type_=D.c.remote_id.type)
        else:
            values["attempts"] = D.c.attempts - 1
        mine = [D.c.id == bindparam("p_delivery_id"), D.c.claimed_by == bindparam("p_worker")]
        if by_claim_time:
            mine.append(D.c.claimed_at == bindparam("p_claimed_at", type_=D.c.claimed_at.type))
        statement = _guarded(event, mine, [State.SENDING], values).returning(D.c.state)
        if with_attempt:
            # A data-modifying WITH runs once and to completion whether or not the UPDATE reads
            # it, so the try is recorded even when the claim was taken back meanwhile.
            row = {key_: bindparam(f"a_{key_}", type_=A.c[key_].type) for key_ in _ATTEMPT_KEYS}
            statement = statement.add_cte(insert(A).values(row).cte("attempt_row"))
        prepared = Prepared(statement, self.engine.dialect)
        self._finishes[key] = prepared
        return prepared

    # ------------------------------------------------------------------ late outcomes

    def settle(self, delivery_id: str, remote_id: str | None, outcome: Result, *, now: datetime) -> State | None:
        """Apply a channel's later word (a gateway's report, a bounce) on a letter it accepted;
        returns the state it moved to, None if it did not move.

        Only a delivery still ``sent`` with this very remote id moves, so a duplicate report, a
        late one for an older try, or one arriving after another final one changes nothing. The
        try's attempt row gets the final outcome. ``remote_id`` None: the far side named no id
        for the try (a relay whose answer we could not read an id from); its last try settles.
        """
        values = _outcome_values(outcome, now)
        values.pop("sent_at", None)  # it went out when it was sent, not when the report came
        with self.engine.begin() as conn:
            moved = move_one(
                conn,
                outcome.event,
                D.c.id == delivery_id,
                D.c.remote_id == remote_id,
                sources=[State.SENT],
                values=values,
            )
            if moved:
                this_try = (
                    A.c.remote_id == remote_id
                    if remote_id is not None
                    else A.c.id == select(func.max(A.c.id)).where(A.c.delivery_id == delivery_id).scalar_subquery()
                )
                conn.execute(
                    update(A)
                    .where(A.c.delivery_id == delivery_id, this_try)
                    .values(outcome=outcome.outcome, code=values["last_code"], text=outcome.text, pages=outcome.pages)
                )
                mirror_digest(conn, delivery_id, now, values)
                if moved in _REPLANNED and outcome.replan is not None:
                    _replan(conn, delivery_id, outcome.replan, now)
        return moved

    # ------------------------------------------------------------------ claims given back

    def hand_back(self, worker: str, now: datetime) -> list[str]:
        """A stopping worker gives back the letters it could not finish: each of ``worker``'s
        claims still in 'sending' goes to 'queued' (the caller puts a message on the queue for
        it), with a transient attempt, as a stale claim would, but at once.

        Compare-and-set on state and claimant: a letter the worker's thread recorded meanwhile, or
        that the reconciler already took back, is left alone.
        """
        return self._release(
            E.HANDED_BACK,
            [D.c.claimed_by == worker],
            now,
            state_text="handed back by {worker} at shutdown, mid-send",
            attempt_text="worker shut down mid-send; handed back (the letter may have gone out)",
            extra={"queued_at": func.coalesce(D.c.queued_at, now)},
        )

    def release_claims(
        self,
        now: datetime,
        *,
        claimed_before: datetime | None = None,
        workers: Sequence[str] | None = None,
    ) -> list[str]:
        """Claims whose worker died mid-send go back to planned, due now: those taken before
        ``claimed_before`` (stale), or held by ``workers`` (seen dead).

        For email this is the one place a letter may repeat: the worker may have died after
        the relay accepted DATA and before it recorded that. The repeat carries the same
        Message-ID, so a deduplicating relay or mail client drops it.
        """
        where: list[ColumnElement[bool]] = []
        if claimed_before is not None:
            where.append(D.c.claimed_at <= claimed_before)
        if workers is not None:
            if not workers:
                return []
            where.append(D.c.claimed_by.in_(list(workers)))
        if not where:
            raise ValueError("release which claims? give claimed_before or workers")
        return self._release(
            E.CLAIM_RELEASED,
            where,
            now,
            state_text="claim by {worker} "
            + ("went stale" if workers is None else "ended with its worker")
            + "; released for another try",
            attempt_text="worker stopped answering mid-send ("
            + ("stale claim" if workers is None else "its liveness lapsed")
            + ")",
            extra={"next_attempt_at": now},
        )

    def _release(
        self,
        event: Event,
        where: list[ColumnElement[bool]],
        now: datetime,
        *,
        state_text: str,
        attempt_text: str,
        extra: Mapping[str, Any],
    ) -> list[str]:
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(D.c.id, D.c.attempts, D.c.claimed_by, D.c.claimed_at).where(D.c.state == State.SENDING, *where)
            ).all()
            released = []
            for row in rows:
                moved = move(
                    conn,
                    event,
                    D.c.id == row.id,
                    D.c.claimed_by == row.claimed_by,
                    values={
                        "claimed_by": None,
                        "claimed_at": None,
                        "updated_at": now,
                        "last_outcome": "transient",
                        "last_text": state_text.format(worker=row.claimed_by),
                        **extra,
                    },
                )
                if moved:
                    started = row.claimed_at or now
                    conn.execute(
                        insert(A).values(
                            delivery_id=row.id,
                            number=row.attempts,
                            started_at=started,
                            duration_ms=(now - started).total_seconds() * 1000.0,
                            outcome="transient",
                            code=None,
                            text=attempt_text,
                            worker=row.claimed_by,
                        )
                    )
                    released.append(row.id)
        return released

    # ------------------------------------------------------------------ the outbox

    def mark_queued(self, ids: Sequence[str], now: datetime) -> int:
        """Record that messages for ``ids`` are about to go on the queue.

        Called *before* the messages are sent: marked afterwards, a fast worker could have
        claimed the letter, failed or deferred it back to planned, and the late mark would
        turn it into a "queued" letter with no message, stranded until the requeue timeout.
        Planned rows become queued; queued rows (a lost message sent again) restart their
        requeue clock; rows a worker already holds keep their state but get ``queued_at`` if
        they lack it.
        """
        if not ids:
            return 0
        with self.engine.begin() as conn:
            return self.release(conn, ids, now)

    @staticmethod
    def release(conn: Connection, ids: Sequence[str], now: datetime) -> int:
        """:meth:`mark_queued` within ``conn``'s transaction (intake marks an appeal's letters in
        the transaction that writes them): one statement."""
        if not ids:
            return 0
        return conn.execute(_release_statement(), {"p_ids": list(ids), "p_now": now}).rowcount

    def unmark_queued(self, ids: Sequence[str], now: datetime) -> None:
        """Back to planned: the queue refused these messages (the reconciler sends them later)."""
        if ids:
            with self.engine.begin() as conn:
                move(conn, E.WITHDRAWN, among(ids), values={"updated_at": now})

    # ------------------------------------------------------------------ the campaign's end

    def expire(self, campaign: str, section: str, deadline: datetime, now: datetime) -> int:
        """Every letter of ``campaign`` in ``section`` not yet out expires once its deadline passed."""
        if now < deadline:
            return 0
        with self.engine.begin() as conn:
            return move(
                conn,
                E.EXPIRED,
                D.c.campaign == campaign,
                D.c.section == section,
                sources=PENDING,
                values={
                    "updated_at": now,
                    "last_outcome": "expired",
                    "last_text": f"campaign deadline {deadline.isoformat()} passed before sending",
                },
            )

    @staticmethod
    def cancel_closed(conn: Connection, delivery_id: str, now: datetime) -> int:
        """Cancel this waiting letter if its campaign is closed (an appeal accepted while its
        campaign was being closed; on PostgreSQL, a move that raced the close)."""
        reason = select(CC.c.reason).where(CC.c.campaign == D.c.campaign).scalar_subquery()
        return move(
            conn,
            E.CANCELLED,
            D.c.id == delivery_id,
            _CLOSED,
            sources=PENDING,
            values={
                "updated_at": now,
                "last_outcome": CANCELLED_OUTCOME,
                "last_text": literal("campaign closed: ") + func.coalesce(reason, ""),
            },
        )

    @staticmethod
    def cancel_campaign(conn: Connection, campaign: str, reason: str, now: datetime) -> int:
        """Cancel every waiting letter of ``campaign``, in every section (within the caller's
        transaction, which records the closure: letters being sent or sent now are cancelled
        by :func:`move` should they come back to waiting)."""
        return move(
            conn,
            E.CANCELLED,
            D.c.campaign == campaign,
            sources=PENDING,
            values={"updated_at": now, "last_outcome": CANCELLED_OUTCOME, "last_text": f"campaign closed: {reason}"},
        )

    @staticmethod
    def cancel_erased(conn: Connection, appeal_ids: Sequence[str], now: datetime) -> list[str]:
        """Cancel every waiting letter of these appeals, whose supporters' data is being erased
        (within the caller's transaction, which blanks the data): planned, queued and bundled ones.
        Letters in a worker's hands or sent are left to finish, and so are letters bundled into a
        digest a worker is sending (they may be on the line); :func:`move` cancels them should
        they come back to waiting. Returns the ids cancelled."""
        if not appeal_ids:
            return []
        statement = _guarded(
            E.CANCELLED,
            [D.c.appeal_id.in_(list(appeal_ids)), ~in_sending_digest()],
            PENDING,
            {"updated_at": now, "last_outcome": CANCELLED_OUTCOME, "last_text": ERASED_TEXT},
        )
        return sorted(conn.execute(statement.returning(D.c.id)).scalars())

    # ------------------------------------------------------------------ dead letters

    @staticmethod
    def withdraw(conn: Connection, delivery_id: str, now: datetime, why: str) -> int:
        """A queued letter whose message will never reach a worker is made due again at once."""
        return move(
            conn,
            E.WITHDRAWN,
            D.c.id == delivery_id,
            values={"next_attempt_at": now, "updated_at": now, "last_text": why},
        )

    # ------------------------------------------------------------------ digests

    def bundle(
        self, member_ids: Sequence[str], route: DigestRoute, now: datetime, *, oldest: datetime
    ) -> tuple[str, int] | None:
        """Bundle these planned, never-tried letters into a digest for ``route``: the route's
        digest still waiting for its first try if there is one, else a new one, dated ``oldest``
        (its oldest letter's creation: it takes that letter's place in the recipient's line).
        Returns the digest's id and how many letters joined it (None if none could: they moved
        meanwhile)."""
        try:
            return self._bundle(member_ids, route, now, oldest)
        except _NothingJoined:
            return None  # rolled back: no empty digest is left behind

    def _bundle(
        self, member_ids: Sequence[str], route: DigestRoute, now: datetime, oldest: datetime
    ) -> tuple[str, int]:
        with self.engine.begin() as conn:
            digest_id = conn.execute(
                select(D.c.id).where(
                    D.c.kind == "digest",
                    D.c.campaign == route.campaign,
                    D.c.section == route.section,
                    D.c.target == route.target,
                    D.c.channel == route.channel,
                    D.c.language == route.language,
                    D.c.state == initial(),
                    D.c.attempts == 0,
                )
            ).scalar()
            if digest_id is None:
                digest_id = new_id("dg")
                conn.execute(
                    insert(D).values(
                        **planned_values(
                            id=digest_id,
                            appeal_id=None,
                            kind="digest",
                            campaign=route.campaign,
                            section=route.section,
                            target=route.target,
                            channel=route.channel,
                            recipient=route.recipient,
                            language=route.language,
                            next_attempt_at=now,
                            message_id=f"<{digest_id}@{route.domain}>",
                            created_at=oldest,
                            updated_at=now,
                        )
                    )
                )
            joined = move(
                conn,
                E.BUNDLED,
                among(member_ids),
                D.c.kind == "letter",
                D.c.attempts == 0,
                values={"digest_id": digest_id, "updated_at": now, "last_text": f"bundled into {digest_id}"},
            )
            if not joined:
                raise _NothingJoined
        return digest_id, joined


@dataclass(frozen=True)
class DigestRoute:
    """Where a digest goes: one target of one section's campaign, by one channel, in one language."""

    campaign: str
    section: str
    target: str
    channel: str
    recipient: str
    language: str
    #: the section sender's domain, for the digest's Message-ID
    domain: str


class _NothingJoined(DispatchError):
    pass


def settled(now: datetime, sent_final_after: Mapping[str, timedelta | None]) -> ColumnElement[bool]:
    """Deliveries nothing more will happen to: terminal, or ``sent`` on a channel whose sends
    settle (``sent_final_after[channel]``: at once for timedelta(0), after a bounce window,
    never for None, as for a fax awaiting its gateway's report)."""
    final_sends = [
        and_(D.c.channel == channel, D.c.sent_at <= now - after)
        for channel, after in sorted(sent_final_after.items())
        if after is not None
    ]
    return or_(D.c.state.in_(sorted(TERMINAL)), and_(D.c.state == State.SENT, or_(*final_sends, literal(False))))
