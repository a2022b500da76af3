"""The state table and its one writer under random histories (issue 8): a hypothesis state
machine drives claims, outcomes, late and out-of-order reports, hand-backs, the reconciler's
sweeps, dead letters, digests, expiry, closures and purges against the real ledger, on SQLite
and on PostgreSQL, and after every step reads every delivery back and checks it against:

* the table: every observed change X → Y is one some rule allows (X among its sources, Y its
  target), and no terminal state ever changes;
* a model of the ledger that predicts each call's answer and the exact state of every
  delivery afterwards (so a move nobody asked for, or one the call should have refused, shows);
* no letter in flight twice: a claim succeeds only on a planned-and-due or queued letter, a
  second claim while one is sending gets None, and a letter is ``sending`` exactly when one
  worker holds it;
* a closed campaign sends nothing more. Precisely, as lifecycle.py promises: from its closing
  on, none of its letters (any section) is planned, queued or bundled, so none can be claimed
  again; the only ones that may still reach ``sent`` or ``delivered`` are those that were
  ``sending`` or ``sent`` when it closed (their send had started: a worker finishing it, or the
  gateway's later report). Any of them that would wait again (a retry, a deferral, a hand-back,
  a released claim, a digest waiting) is cancelled instead.

The machine runs one step at a time: it checks what sequences of moves do, not races between
concurrent transactions.

Rows are inserted as intake writes them (``planned_values``); each example starts from empty
tables, so one ledger (and one PostgreSQL database) serves all of a test's examples.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, insert, select

from dispatcher.channels.email.channel import EmailChannel
from dispatcher.channels.fax.channel import FaxChannel
from dispatcher.ledger.actions import ActionRefused
from dispatcher.ledger.lifecycle import Claim, DigestRoute, Result, move, one, planned_values
from dispatcher.ledger.states import (
    DIGEST_FOLLOWS,
    OPERATOR_EVENTS,
    PENDING,
    REOPENABLE,
    RULES,
    TERMINAL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    check_table,
)
from dispatcher.ledger.store import Ledger
from dispatcher.ledger.tables import AP, CC, DL, ER, A, D

S, E = State, Event

CAMPAIGNS = ("UA-1", "UA-2")
SECTIONS = ("us", "ch")
WORKERS = ("worker-a", "worker-b")
CHANNELS = (EmailChannel, FaxChannel)
#: what a worker may report at the end of a send (every event whose sources hold 'sending' but
#: the claim itself and the moves of the reconciler and of shutdown, tested by rules of their own)
SEND_OUTCOMES = (E.SENT, E.DELIVERED, E.RETRY, E.DEFERRED, E.FAILED, E.EXPIRED, E.CANCELLED)
#: what a gateway's later report may say, plus one it cannot (SENT: it starts from 'sending' only)
LATE_OUTCOMES = (E.DELIVERED, E.BOUNCED, E.RETRY, E.DEFERRED, E.FAILED, E.SENT)
#: every (event, state) the writer must refuse up front: those the table does not list, and any
#: move out of a terminal state whatever the table says (a table that let one out would be wrong)
#: but an operator's retry of a failed or bounced letter (tests/test_letter_actions.py)
ILLEGAL = sorted(
    {
        (r.event, s)
        for r in RULES
        if r.sources
        for s in State
        if s not in r.sources or (s in TERMINAL and not (r.event in OPERATOR_EVENTS and s in REOPENABLE))
    },
    key=lambda pair: (pair[0].value, pair[1].value),
)
#: for the table check: every one-step change the table allows
ALLOWED_STEPS = {(source, r.target) for r in RULES for source in r.sources}
#: intake's clock at the start of every example
T0 = datetime(2030, 1, 7, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Row:
    """One delivery as read back after a step."""

    state: State
    campaign: str
    section: str
    target: str
    channel: str
    kind: str
    appeal_id: str | None
    digest_id: str | None
    attempts: int
    next_attempt_at: datetime
    claimed_by: str | None
    claimed_at: datetime | None
    remote_id: str | None
    sent_at: datetime | None


@dataclass(frozen=True)
class Held:
    """A claim as the worker holds it."""

    worker: str
    claim: Claim
    claimed_at: datetime


def outcome(event: Event, remote_id: str | None = None, next_attempt_at: datetime | None = None) -> Result:
    deferred = event == E.DEFERRED
    return Result(
        event,
        "deferred" if deferred else event.value,
        text=f"test says {event.value}",
        remote_id=remote_id,
        next_attempt_at=next_attempt_at,
        counts_as_try=not deferred,
    )


def read(ledger: Ledger) -> dict[str, Row]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(
                D.c.id,
                D.c.state,
                D.c.campaign,
                D.c.section,
                D.c.target,
                D.c.channel,
                D.c.kind,
                D.c.appeal_id,
                D.c.digest_id,
                D.c.attempts,
                D.c.next_attempt_at,
                D.c.claimed_by,
                D.c.claimed_at,
                D.c.remote_id,
                D.c.sent_at,
            )
        ).all()
    return {r.id: Row(State(r.state), *r[2:]) for r in rows}


def machine_for(ledger: Ledger) -> type[RuleBasedStateMachine]:
    sent_final_after = ledger.housekeeping.sent_final_after
    lifecycle = ledger.lifecycle

    class LedgerMachine(RuleBasedStateMachine):
        deliveries = Bundle("deliveries")

        def __init__(self) -> None:
            super().__init__()
            # A fresh example starts from empty tables (cheaper than a database each).
            with ledger.engine.begin() as conn:
                for table in (A, ER, DL, D, AP, CC):
                    conn.execute(delete(table))
            self.now = T0
            # Ids, and the order rules choose letters in, must not depend on the example before
            # (hypothesis replays an example to shrink it): digests' ids are random.
            self.counter = itertools.count()
            self.rows: dict[str, Row] = {}
            #: every delivery, in the order it appeared
            self.known: list[str] = []
            self.history: dict[str, list[State]] = {}
            #: campaign → the letters that were sending or sent when it closed
            self.closed: dict[str, frozenset[str]] = {}
            #: delivery → the claim its worker holds
            self.held: dict[str, Held] = {}
            #: claims that ended (finished, taken back, handed back, cancelled): a slow thread may
            #: still report them
            self.ended: list[Held] = []
            #: delivery → every remote id its sends were given
            self.remote_ids: dict[str, list[str]] = {}
            #: appeal → created_at, and the purged ones
            self.appeals: dict[str, datetime] = {}
            self.purged: set[str] = set()
            #: the letters an operator's retry is taking out of a terminal state in this step
            self.reopened: set[str] = set()

        # ------------------------------------------------------------------ the model

        def expect_move(
            self,
            rows: dict[str, Row],
            ids: list[str],
            event: Event,
            sources: frozenset[State] | None = None,
        ) -> dict[str, State]:
            """What move() does to ``ids``, as lifecycle.py documents it: the event's target, or
            cancelled instead of waiting again when the campaign is closed and the move brings
            letters back from a worker's hands or from 'sent'."""
            start = TRANSITIONS[event].sources if sources is None else sources
            target = TRANSITIONS[event].target
            guarded = target in PENDING and bool(start & {S.SENDING, S.SENT})
            out = {}
            for i in ids:
                if rows[i].state in start:
                    closed = rows[i].campaign in self.closed
                    out[i] = S.CANCELLED if guarded and closed else target
            return out

        def expect_mirror(self, rows: dict[str, Row], digest: str, state: State) -> dict[str, State]:
            """A digest's letters follow its new state."""
            if state not in DIGEST_FOLLOWS:
                return {}
            event = DIGEST_FOLLOWS[state]
            members = [i for i, r in rows.items() if r.digest_id == digest]
            return self.expect_move(rows, members, event, TRANSITIONS[event].sources & {S.BUNDLED, S.SENT})

        def observe(self, expected: dict[str, State]) -> dict[str, Row]:
            """Read every delivery back and check it: first the invariants, which hold whatever
            the step was, then the model's prediction of this step."""
            before, after = self.rows, read(ledger)
            assert set(after) >= set(before), "a delivery disappeared"
            for i in sorted(set(after) - set(before)):
                self.known.append(i)
                self.history[i] = []
            for i, row in after.items():
                old = before[i].state if i in before else None
                seen = self.history[i]
                if row.state != old:
                    seen.append(row.state)
                if old is None:
                    assert row.state == S.PLANNED, f"{i} was created {row.state}"
                elif row.state != old:
                    # the table: no way out of a terminal state, and only the steps it lists
                    assert old not in TERMINAL or (i in self.reopened and old in REOPENABLE), (
                        f"{i} left terminal state {old}: {seen}"
                    )
                    assert (old, row.state) in ALLOWED_STEPS, f"{i}: {old} → {row.state} is not in the table: {seen}"
                # in flight once: 'sending' exactly while a worker holds it (a claim names one)
                assert (row.state == S.SENDING) == (row.claimed_by is not None), (
                    f"{i} is {row.state} with claimed_by={row.claimed_by}"
                )
                if row.campaign in self.closed:
                    # a closed campaign sends nothing more: nothing of it waits, so nothing of it
                    # can be claimed; only a letter whose send had started may still go out
                    assert row.state not in PENDING, f"{i} of closed {row.campaign} is {row.state}: {seen}"
                    if row.state != old and row.state in (S.SENT, S.DELIVERED):
                        assert i in self.closed[row.campaign], (
                            f"{i} of closed {row.campaign} reached {row.state}, not in flight at the close: {seen}"
                        )
            for i, row in after.items():
                want = expected.get(i, before[i].state if i in before else S.PLANNED)
                assert row.state == want, f"{i} is {row.state}, the model expected {want}: {self.history[i]}"
            # a claim no longer in the ledger has ended: its worker's thread may still report it
            for i, held in list(self.held.items()):
                row = after[i]
                if row.state != S.SENDING or row.claimed_by != held.worker or row.claimed_at != held.claimed_at:
                    self.ended.append(self.held.pop(i))
            self.rows = after
            return after

        # ------------------------------------------------------------------ intake and time

        @initialize(target=deliveries, campaign=st.sampled_from(CAMPAIGNS), section=st.sampled_from(SECTIONS))
        def first_appeal(self, campaign: str, section: str) -> Any:
            return self.appeal(campaign, section, 0, 0)

        @precondition(lambda self: len(self.appeals) < 6)
        @rule(
            target=deliveries,
            campaign=st.sampled_from(CAMPAIGNS),
            section=st.sampled_from(SECTIONS),
            age_days=st.integers(0, 3),
            due_in_minutes=st.sampled_from([0, 0, -5, 30]),
        )
        def new_appeal(self, campaign: str, section: str, age_days: int, due_in_minutes: int) -> Any:
            if campaign in self.closed:
                return multiple()  # intake refuses a closed campaign's appeals
            return self.appeal(campaign, section, age_days, due_in_minutes)

        def appeal(self, campaign: str, section: str, age_days: int, due_in_minutes: int) -> Any:
            """One appeal to one target: a letter by email and one by fax, as intake writes them."""
            n = next(self.counter)
            appeal_id = f"ap_{n}"
            created = self.now - timedelta(days=age_days)
            ids = [f"dl_{n}_{kind.name}" for kind in CHANNELS]
            with ledger.engine.begin() as conn:
                conn.execute(
                    insert(AP).values(
                        id=appeal_id,
                        campaign=campaign,
                        section=section,
                        language="en",
                        client_ref=f"ref-{n}",
                        supporter_ref=f"sup-{n}",
                        created_at=created,
                        supporter_name="Jane Doe",
                        supporter_email=f"jane{n}@example.org",
                        message="Please act now.",
                    )
                )
                for delivery_id, kind in zip(ids, CHANNELS, strict=True):
                    conn.execute(
                        insert(D).values(
                            **planned_values(
                                id=delivery_id,
                                appeal_id=appeal_id,
                                kind="letter",
                                campaign=campaign,
                                section=section,
                                target="minister",
                                channel=kind.name,
                                recipient=f"minister@{kind.name}.example",
                                language="en",
                                next_attempt_at=self.now + timedelta(minutes=due_in_minutes),
                                message_id=f"<{delivery_id}@example.org>",
                                created_at=created,
                                updated_at=self.now,
                            )
                        )
                    )
            self.appeals[appeal_id] = created
            self.observe({})
            return multiple(*ids)

        @rule(minutes=st.sampled_from([1, 5, 20, 60, 60 * 24 * 6]), retention_days=st.sampled_from([0, 1, 30]))
        def time_passes(self, minutes: int, retention_days: int) -> None:
            """The clock moves on, and the reconciler's housekeeping purges what it may."""
            self.now += timedelta(minutes=minutes)
            self.purge(retention_days)

        # ------------------------------------------------------------------ the worker

        def due(self, delivery: str) -> bool:
            row = self.rows[delivery]
            return row.state == S.QUEUED or (row.state == S.PLANNED and row.next_attempt_at <= self.now)

        @rule(delivery=deliveries, worker=st.sampled_from(WORKERS), a_due_one=st.booleans(), data=st.data())
        def claim(self, delivery: str, worker: str, a_due_one: bool, data: Any) -> None:
            """A worker claims any letter (a redelivered message, a second worker), or, half the
            time, one that is due (so that histories get beyond the claim)."""
            self.take(self.pick_due(delivery, a_due_one, data), worker)

        @rule(
            delivery=deliveries,
            worker=st.sampled_from(WORKERS),
            data=st.data(),
            event=st.sampled_from(SEND_OUTCOMES),
            with_remote_id=st.sampled_from([True, True, True, False]),
        )
        def send(self, delivery: str, worker: str, data: Any, event: Event, with_remote_id: bool) -> None:
            """A quick send: a due letter claimed and its outcome recorded before anything else
            happens (the common case, and the way to letters that are sent, for late reports)."""
            held = self.take(self.pick_due(delivery, True, data), worker)
            if held is not None:
                self.end_send(held, worker, event, with_remote_id, 0)

        def pick_due(self, delivery: str, a_due_one: bool, data: Any) -> str:
            candidates = [i for i in self.known if self.due(i)]
            if a_due_one and candidates:
                return data.draw(st.sampled_from(candidates), label="due delivery")
            return delivery

        def take(self, delivery: str, worker: str) -> Held | None:
            row = self.rows[delivery]
            due = self.due(delivery)
            got = lifecycle.claim(delivery, worker, self.now)
            # a letter is taken only when waiting and due: never one being sent (nor anything else)
            assert (got is not None) == due, f"claim of {row.state} {delivery} gave {got}"
            self.observe({delivery: S.SENDING} if due else {})
            if got is None:
                return None
            assert got.id == delivery and got.attempt == row.attempts + 1
            assert row.campaign not in self.closed, "a closed campaign's letter was claimed"
            self.held[delivery] = Held(worker, got, self.now)
            return self.held[delivery]

        @precondition(lambda self: self.held)
        @rule(
            data=st.data(),
            same_worker=st.booleans(),
            event=st.sampled_from(SEND_OUTCOMES),
            # (a send recorded without an id happens: an email relay's answer may name none)
            with_remote_id=st.sampled_from([True, True, True, False]),
            backoff=st.integers(0, 30),
        )
        def finish(self, data: Any, same_worker: bool, event: Event, with_remote_id: bool, backoff: int) -> None:
            delivery = data.draw(st.sampled_from([i for i in self.known if i in self.held]), label="delivery")
            held = self.held[delivery]
            worker = held.worker if same_worker else next(w for w in WORKERS if w != held.worker)
            self.end_send(held, worker, event, with_remote_id, backoff)

        @precondition(lambda self: self.ended)
        @rule(data=st.data(), event=st.sampled_from(SEND_OUTCOMES), with_remote_id=st.booleans())
        def late_finish(self, data: Any, event: Event, with_remote_id: bool) -> None:
            """A thread whose claim ended meanwhile (taken back as stale, handed back, cancelled,
            or a duplicate of a finish) records its send after all."""
            held = data.draw(st.sampled_from(self.ended), label="ended claim")
            self.end_send(held, held.worker, event, with_remote_id, 0)

        def end_send(self, held: Held, worker: str, event: Event, with_remote_id: bool, backoff: int) -> None:
            delivery = held.claim.id
            row = self.rows[delivery]
            remote_id = f"r{next(self.counter)}" if with_remote_id else None
            result = outcome(event, remote_id, self.now + timedelta(minutes=backoff))
            # A finish is the claim's only while the letter is sending under that very claim (its
            # worker and the moment it was taken): an older claim of the same worker, taken back
            # and then claimed again, ends nothing.
            ours = row.state == S.SENDING and row.claimed_by == worker and row.claimed_at == held.claimed_at
            moved = lifecycle.finish(held.claim, result, worker=worker, started_at=held.claimed_at, now=self.now)
            assert (moved is not None) == ours, f"finish of {row.state} {delivery} by {worker} gave {moved}"
            expected = self.expect_move(self.rows, [delivery], event, frozenset({S.SENDING})) if ours else {}
            if ours:
                assert moved == expected[delivery]
            if ours and row.kind == "digest":
                expected |= self.expect_mirror(self.rows, delivery, expected[delivery])
            self.observe(expected)
            if ours and remote_id is not None:
                self.remote_ids.setdefault(delivery, []).append(remote_id)

        # ------------------------------------------------------------------ the gateway's later word

        @rule(
            delivery=deliveries,
            which=st.sampled_from(["current", "current", "earlier", "unknown"]),
            event=st.sampled_from(LATE_OUTCOMES),
            backoff=st.integers(0, 30),
            a_sent_one=st.booleans(),
            data=st.data(),
        )
        def late_report(
            self, delivery: str, which: str, event: Event, backoff: int, a_sent_one: bool, data: Any
        ) -> None:
            """A gateway's report, about any letter or, half the time, one that was sent: about its
            current send, an earlier one (a duplicate, or out of order), or a send we never made."""
            sent = [i for i in self.known if self.rows[i].state == S.SENT]
            if a_sent_one and sent:
                delivery = data.draw(st.sampled_from(sent), label="sent delivery")
            row = self.rows[delivery]
            known = self.remote_ids.get(delivery, [])
            if which == "current" and row.remote_id is not None:
                remote_id = row.remote_id
            elif which == "earlier" and known:
                remote_id = known[0]  # a duplicate, or a report about an earlier try
            else:
                remote_id = f"never-{next(self.counter)}"
            result = outcome(event, next_attempt_at=self.now + timedelta(minutes=backoff))
            if S.SENT not in TRANSITIONS[event].sources:
                with pytest.raises(IllegalTransition):
                    lifecycle.settle(delivery, remote_id, result, now=self.now)
                self.observe({})
                return
            # Only a report naming the letter's recorded remote id moves it, and only while 'sent'.
            # (Each try records its own remote id, none if the far side named none: a report about
            # an earlier try never settles a later one.)
            applies = row.state == S.SENT and row.remote_id == remote_id
            moved = lifecycle.settle(delivery, remote_id, result, now=self.now)
            assert (moved is not None) == applies, (
                f"report {remote_id} on {row.state} {delivery} (id {row.remote_id}) gave {moved}"
            )
            expected = self.expect_move(self.rows, [delivery], event, frozenset({S.SENT})) if applies else {}
            if applies:
                assert moved == expected[delivery]
            if applies:
                expected |= self.expect_mirror(self.rows, delivery, expected[delivery])
            self.observe(expected)

        # ------------------------------------------------------------------ the outbox and the reconciler

        # (Related actors share a rule, so that hypothesis, which picks rules evenly, spends
        # most steps on the worker's path and the gateway's reports.)

        @rule(
            ids=st.lists(deliveries, min_size=1, max_size=3, unique=True),
            how=st.sampled_from(["queued", "refused by the queue", "dead-lettered"]),
        )
        def outbox(self, ids: list[str], how: str) -> None:
            if how == "queued":
                lifecycle.mark_queued(ids, self.now)
                self.observe(self.expect_move(self.rows, ids, E.RELEASED))
            elif how == "refused by the queue":
                lifecycle.unmark_queued(ids, self.now)
                self.observe(self.expect_move(self.rows, ids, E.WITHDRAWN))
            else:
                n = next(self.counter)
                letter = {
                    "message_id": f"m-{n}",
                    "delivery_id": ids[0],
                    "queue": "deliveries",
                    "actor": "deliver",
                    "reason": "RuntimeError: boom",
                    "failed_at": self.now,
                }
                # the middleware and the sweep both record it: the second time changes nothing
                assert ledger.housekeeping.record_dead_letters([letter], self.now) == [f"m-{n}"]
                assert ledger.housekeeping.record_dead_letters([letter], self.now) == []
                self.observe(self.expect_move(self.rows, ids[:1], E.WITHDRAWN))

        @rule(
            worker=st.sampled_from(WORKERS),
            how=st.sampled_from(["handed back", "found dead", "stale after 10 min"]),
        )
        def claims_taken_back(self, worker: str, how: str) -> None:
            """A stopping worker hands its letters back; the reconciler takes back the claims of a
            worker seen dead, or every claim older than its time limit."""
            sending = {i: r for i, r in self.rows.items() if r.state == S.SENDING}
            if how == "handed back":
                mine = sorted(i for i, r in sending.items() if r.claimed_by == worker)
                assert sorted(lifecycle.hand_back(worker, self.now)) == mine
                self.observe(self.expect_move(self.rows, mine, E.HANDED_BACK))
            elif how == "found dead":
                theirs = sorted(i for i, r in sending.items() if r.claimed_by == worker)
                assert sorted(lifecycle.release_claims(self.now, workers=[worker])) == theirs
                self.observe(self.expect_move(self.rows, theirs, E.CLAIM_RELEASED))
            else:
                cutoff = self.now - timedelta(minutes=int(how.split()[2]))
                stale = sorted(i for i, r in sending.items() if r.claimed_at is not None and r.claimed_at <= cutoff)
                assert sorted(lifecycle.release_claims(self.now, claimed_before=cutoff)) == stale
                self.observe(self.expect_move(self.rows, stale, E.CLAIM_RELEASED))

        # ------------------------------------------------------------------ an operator's hand

        @rule(
            delivery=deliveries,
            action=st.sampled_from(["retry", "cancel", "hand back"]),
            saw_it_as_it_is=st.booleans(),
            offered=st.booleans(),
            data=st.data(),
        )
        def operator_acts(self, delivery: str, action: str, saw_it_as_it_is: bool, offered: bool, data: Any) -> None:
            """An operator retries, cancels or hands back one letter from the console
            (ledger.actions): a compare-and-set on the state the page showed, refused when the
            letter moved meanwhile, when its campaign is closed or its supporter's data is gone
            (a retry), and for digests (a retry). ``offered``: a letter the action is offered for
            (a failed or bounced one for a retry, say), if there is one."""
            event = {"retry": E.OPERATOR_RETRY, "cancel": E.OPERATOR_CANCEL, "hand back": E.OPERATOR_HAND_BACK}[action]
            candidates = [i for i in self.known if self.rows[i].state in TRANSITIONS[event].sources]
            # a retry is offered for letters in backoff too, but the way out of a terminal state is the point
            candidates = [i for i in candidates if self.rows[i].state in TERMINAL] or candidates
            if offered and candidates:
                delivery = data.draw(st.sampled_from(candidates))
            row = self.rows[delivery]
            seen = row.state if saw_it_as_it_is else S.PLANNED
            refused = seen != row.state or row.state not in TRANSITIONS[event].sources
            if action == "retry":
                refused = refused or (
                    row.kind != "letter"
                    or row.digest_id is not None
                    or row.campaign in self.closed
                    or row.appeal_id in self.purged
                )
            actions = ledger.actions
            kw = {"actor": "olga", "reason": "checked", "now": self.now, "expected": seen}
            try:
                if action == "retry":
                    self.reopened = {delivery}
                    done = actions.retry_now(delivery, deadline=self.now + timedelta(days=1), **kw)
                elif action == "cancel":
                    done = actions.cancel(delivery, **kw)
                else:
                    done = actions.hand_back(delivery, **kw)
            except ActionRefused:
                assert refused, f"{action} of {delivery} ({row.state}, seen {seen}) was refused"
                self.observe({})
            else:
                assert not refused, f"{action} of {delivery} ({row.state}, seen {seen}) went through"
                expected = self.expect_move(self.rows, [delivery], event, frozenset({row.state}))
                assert done.after == expected[delivery]
                self.observe(expected)
            finally:
                self.reopened = set()

        # ------------------------------------------------------------------ digests

        @rule(target=deliveries, delivery=deliveries)
        def digest(self, delivery: str) -> Any:
            """The pacer bundles every letter of ``delivery``'s route into a digest."""
            row = self.rows[delivery]
            route = DigestRoute(
                row.campaign,
                row.section,
                row.target,
                row.channel,
                f"minister@{row.channel}.example",
                "en",
                "example.org",
            )
            where = (row.campaign, row.section, row.target, row.channel)
            members = sorted(
                i
                for i, r in self.rows.items()
                if r.kind == "letter" and (r.campaign, r.section, r.target, r.channel) == where
            )
            joining = [i for i in members if self.rows[i].state == S.PLANNED and self.rows[i].attempts == 0]
            waiting = [
                i
                for i, r in self.rows.items()
                if r.kind == "digest"
                and (r.campaign, r.section, r.target, r.channel) == where
                and r.state == S.PLANNED
                and r.attempts == 0
            ]
            got = lifecycle.bundle(members, route, self.now, oldest=self.now)
            if not joining:
                assert got is None
                self.observe({})
                return multiple()
            assert got is not None
            digest, joined = got
            assert joined == len(joining)
            if waiting:
                assert digest in waiting, "a digest still waiting for its first try takes the new letters"
            self.observe(self.expect_move(self.rows, joining, E.BUNDLED))
            return multiple() if waiting else digest

        # ------------------------------------------------------------------ the campaign's end

        @rule(campaign=st.sampled_from(CAMPAIGNS), section=st.sampled_from(SECTIONS), passed=st.booleans())
        def deadline(self, campaign: str, section: str, passed: bool) -> None:
            """The reconciler expires a section's waiting letters once its deadline passed."""
            deadline = self.now - timedelta(minutes=1) if passed else self.now + timedelta(minutes=1)
            ids = [i for i, r in self.rows.items() if (r.campaign, r.section) == (campaign, section)]
            expected = self.expect_move(self.rows, ids, E.EXPIRED, frozenset(PENDING)) if passed else {}
            assert lifecycle.expire(campaign, section, deadline, self.now) == len(expected)
            self.observe(expected)

        @rule(campaign=st.sampled_from(CAMPAIGNS))
        def close(self, campaign: str) -> None:
            """An operator closes the campaign: every section's waiting letters are cancelled."""
            ids = [i for i, r in self.rows.items() if r.campaign == campaign]
            already = campaign in self.closed
            expected = {} if already else self.expect_move(self.rows, ids, E.CANCELLED, frozenset(PENDING))
            cancelled = ledger.controls.close_campaign(campaign, "the detainee was released", self.now)
            assert cancelled == (None if already else len(expected))
            if not already:
                self.closed[campaign] = frozenset(i for i in ids if self.rows[i].state in (S.SENDING, S.SENT))
            self.observe(expected)

        # ------------------------------------------------------------------ housekeeping

        def purge(self, retention_days: int) -> None:
            def settled(r: Row) -> bool:
                after = sent_final_after[r.channel]
                if r.state in TERMINAL:
                    return True
                return (
                    r.state == S.SENT and after is not None and r.sent_at is not None and r.sent_at <= self.now - after
                )

            unfinished = {r.appeal_id for r in self.rows.values() if r.appeal_id and not settled(r)}
            due = {
                a
                for a, created in self.appeals.items()
                if a not in self.purged and a not in unfinished and created <= self.now - timedelta(days=retention_days)
            }
            assert ledger.housekeeping.purge_personal_data(self.now, timedelta(days=retention_days)) == len(due)
            self.purged |= due
            with ledger.engine.connect() as conn:
                blank = set(conn.execute(select(AP.c.id).where(AP.c.supporter_name.is_(None))).scalars())
            assert blank == self.purged
            self.observe({})  # the purge blanks supporters' data, never a letter's state

        # ------------------------------------------------------------------ what the writer refuses

        @rule(delivery=deliveries)
        def illegal_moves(self, delivery: str) -> None:
            """Every move the writer must refuse, asked for one letter (so, for its current state,
            with the letter really in that state): each is refused before any SQL runs, and nothing
            is written. (A move that went through would be committed, for the checks to see.)"""
            with ledger.engine.begin() as conn:
                for event, state in ILLEGAL:
                    with pytest.raises(IllegalTransition):
                        move(conn, event, one(delivery), sources=[state], values={"updated_at": self.now})
            self.observe({})

    return LedgerMachine


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    # when a sent letter is settled, for the purge: as the channel registry says
    ledger = Ledger(database_url, sent_final_after={kind.name: kind.sent_final_after for kind in CHANNELS})
    ledger.migrate()
    yield ledger
    ledger.dispose()


def test_random_histories_keep_the_state_table(ledger: Ledger) -> None:
    run_state_machine_as_test(
        machine_for(ledger),
        settings=settings(
            max_examples=200,
            stateful_step_count=40,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_the_table_lets_nothing_out_of_a_terminal_state() -> None:
    """The table's own invariants, checked on the table itself: a terminal state wrongly added to
    the sources of a move to a waiting state (a retry, say) would not show in the ledger's
    behaviour, because move() then also builds the closed-campaign guard's compare-and-set for
    'cancelled' from those sources, and that refuses a terminal one."""
    check_table()  # terminal states have no way out, every state is reached, the others lead on
